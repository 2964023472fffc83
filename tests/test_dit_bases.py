"""FLUX.1 and SD3 bases: the diffusers scripts' layers, flow-matching training that learns and resumes exactly, and
exports that diffusers' own loaders (`FluxPipeline` / `StableDiffusion3Pipeline.load_lora_weights`, plain
`from_pretrained` of a merged folder) turn back into the adapted model. Real pipelines built from configs (CLIP BPE
from the open-clip wheel, a T5 tokenizer made here), saved and loaded by diffusers."""

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from ether_diffusion import EtherError
from ether_diffusion.bases import check_model_index, family
from ether_diffusion.inject import find_targets
from ether_diffusion.pipelines import load_ether_weights, load_pipeline, pipeline_components, schedulers_for, set_scheduler
from ether_diffusion.testing import full_size_transformer as full_size
from ether_diffusion.testing import tiny_flux_pipeline, tiny_sd3_pipeline
from ether_diffusion.train.common import encode_text
from ether_diffusion.train.config import DreamBoothConfig
from ether_diffusion.train.dreambooth import train_dreambooth
from ether_diffusion.train.objectives import make_objective

KINDS = ("flux", "sd3")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit")
    tiny_flux_pipeline().save_pretrained(root / "flux")
    tiny_sd3_pipeline().save_pretrained(root / "sd3")
    (root / "inst").mkdir()
    for i, colour in enumerate(("red", "navy")):
        image = Image.new("RGB", (32, 32), "white")
        image.paste(Image.new("RGB", (16, 16), colour), (8 * i, 8))
        image.save(root / "inst" / f"{i}.png")
    return root


def config(dit, kind, out, **overrides):
    values = dict(base=str(dit / kind), instance_dir=str(dit / "inst"), instance_prompt="a sks dog", output_dir=str(out),
                  resolution=32, max_sequence_length=16, max_steps=4, checkpointing_steps=2, learning_rate=3e-2)
    return DreamBoothConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def trained(dit, tmp_path_factory):
    """One adapter per base (denoiser and CLIP text encoders, prior preservation) and its exports."""
    from ether_diffusion.cli import main

    root = tmp_path_factory.mktemp("trained")
    out = {}
    for kind in KINDS:
        run = root / kind
        train_dreambooth(config(dit, kind, run, max_steps=6, train_text_encoder=True, with_prior_preservation=True,
                                class_prompt="a dog", class_dir=str(run / "class"), num_class_images=2,
                                class_generation_steps=2))
        adapter = run / "ether_adapter.safetensors"
        for to in ("lora", "merged"):
            assert main(["export", str(adapter), "--base", str(dit / kind), "--to", to, "--dtype", "fp32",
                         "--out", str(run / f"export-{to}")]) == 0
        out[kind] = run
    return out


# -- which layers ---------------------------------------------------------------------------------------------------

ATTN = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
        "attn.add_v_proj", "attn.to_add_out"]  # diffusers' train_dreambooth_lora_{flux,sd3}.py target_modules


def test_attn_preset_is_the_diffusers_scripts_layers_on_full_size_flux_and_sd35():
    flux = set(find_targets(full_size("flux"), "attn"))
    want = {f"transformer_blocks.{i}.{m}" for i in range(19) for m in ATTN}
    want |= {f"single_transformer_blocks.{i}.attn.to_{x}" for i in range(38) for x in "qkv"}
    assert flux == want
    sd3 = set(find_targets(full_size("sd3"), "attn"))
    want = {f"transformer_blocks.{i}.{m}" for i in range(24) for m in ATTN}
    want.discard("transformer_blocks.23.attn.to_add_out")  # the last block is context_pre_only
    assert sd3 == want and not any(".attn2." in n for n in sd3)  # SD3.5's second attention is left alone


@pytest.mark.parametrize("kind", KINDS)
def test_lora_keys_of_full_size_bases_are_the_diffusers_loaders_keys(kind):
    """The keys `FluxPipeline` / `StableDiffusion3Pipeline.load_lora_weights` look for (`transformer.` + the PEFT
    module name + `.lora_A/B.weight`), for every layer of the full-size transformer's `attn` preset."""
    from ether_diffusion.export import lora_key_names

    blocks, singles = (19, 38) if kind == "flux" else (24, 0)
    want = {f"transformer.transformer_blocks.{i}.{m}.lora_{ab}.weight" for i in range(blocks) for m in ATTN
            for ab in "AB"}
    want -= {f"transformer.transformer_blocks.23.attn.to_add_out.lora_{ab}.weight" for ab in "AB"} if kind == "sd3" else set()
    want |= {f"transformer.single_transformer_blocks.{i}.attn.to_{x}.lora_{ab}.weight" for i in range(singles)
             for x in "qkv" for ab in "AB"}
    got = {key for name in find_targets(full_size(kind), "attn")
           for key in lora_key_names("transformer", name, "diffusers", False)[:2]}
    assert got == want


def test_attn_ff_adds_the_feed_forwards_and_flux_single_block_mlps_only():
    flux = set(find_targets(full_size("flux"), "attn+ff")) - set(find_targets(full_size("flux"), "attn"))
    assert {n.split(".", 2)[-1] for n in flux if n.startswith("transformer_blocks.")} == {
        "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"}
    assert {n.split(".", 2)[-1] for n in flux if n.startswith("single_")} == {"proj_mlp", "proj_out"}
    assert "proj_out" not in flux and len(flux) == 19 * 4 + 38 * 2  # the model's final proj_out is not a block's


def test_only_clip_text_encoders_are_components_and_the_family_comes_from_the_loaded_model(dit):
    flux, sd3 = load_pipeline(str(dit / "flux")), load_pipeline(str(dit / "sd3"))
    assert (family(flux).name, family(sd3).name) == ("flux", "sd3")
    assert list(pipeline_components(flux)) == ["transformer", "text_encoder"]  # text_encoder_2 is FLUX's T5
    assert list(pipeline_components(sd3)) == ["transformer", "text_encoder", "text_encoder_2"]  # not the T5
    assert type(flux.text_encoder_2).__name__ == "T5EncoderModel"


def test_an_unsupported_pipeline_folder_is_refused_in_one_line_naming_the_supported_ones():
    index = {"_class_name": "PixArtAlphaPipeline", "transformer": ["diffusers", "PixArtTransformer2DModel"]}
    with pytest.raises(EtherError, match=r"PixArtAlphaPipeline \(denoiser: PixArtTransformer2DModel\) is not "
                                         r"supported.*FluxPipeline, StableDiffusion3Pipeline"):
        check_model_index(index)


def test_only_flow_matching_solvers_fit(dit):
    pipe = load_pipeline(str(dit / "flux"))
    assert schedulers_for(pipe) == ["FlowMatch Euler"]
    with pytest.raises(EtherError, match="'DPM\\+\\+ 2M' does not fit this FLUX base; choose one of: FlowMatch Euler"):
        set_scheduler(pipe, "DPM++ 2M")
    set_scheduler(pipe, "FlowMatch Euler")
    assert pipe.scheduler.config.shift == tiny_flux_pipeline().scheduler.config.shift


# -- training -------------------------------------------------------------------------------------------------------

def fixed_batch_loss(pipe, cfg) -> float:
    """The flow-matching loss on the instance pictures, over 16 fixed noise / timestep draws."""
    from contextlib import nullcontext

    from ether_diffusion.data import load_folder
    from ether_diffusion.train.loop import LatentSource

    examples = load_folder(cfg.instance_dir, cfg.instance_prompt)
    source = LatentSource(pipe, examples, 32, "cpu", cache=True)
    objective = make_objective(pipe, cfg, 32, torch.float32, "cpu")
    cond = encode_text(pipe, [e.caption for e in examples], "cpu", cfg.max_sequence_length)
    total = 0.0
    with torch.no_grad():
        for seed in range(16):
            g = torch.Generator().manual_seed(seed)
            latents = source.latents(list(range(len(examples))), g)
            total += objective.loss(latents, cond, g, nullcontext).mean().item()
    return total / 16


@pytest.mark.parametrize("kind", KINDS)
def test_training_lowers_the_flow_matching_loss_on_a_fixed_batch(dit, tmp_path, kind):
    pipe = load_pipeline(str(dit / kind))
    cfg = config(dit, kind, tmp_path / "run", max_steps=40, checkpointing_steps=40, learning_rate=1e-1,
                 targets="attn+ff")
    before = fixed_batch_loss(pipe, cfg)
    train_dreambooth(cfg, pipe=pipe)
    after = fixed_batch_loss(pipe, cfg)
    assert after < 0.97 * before, (before, after)  # measured: FLUX 0.90×, SD3 0.96× (random-init transformers)


@pytest.mark.parametrize("kind", KINDS)
def test_resume_is_exact(dit, tmp_path, kind):
    from safetensors.torch import load_file

    whole, split = tmp_path / "whole", tmp_path / "split"
    train_dreambooth(config(dit, kind, whole))
    train_dreambooth(config(dit, kind, split, max_steps=2))
    train_dreambooth(config(dit, kind, split, resume_from_checkpoint="latest"))
    a, b = load_file(whole / "ether_adapter.safetensors"), load_file(split / "ether_adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_flux_and_sd3_defaults_follow_the_diffusers_scripts(dit):
    flux, sd3 = load_pipeline(str(dit / "flux")), load_pipeline(str(dit / "sd3"))
    cfg = DreamBoothConfig(instance_dir="x", instance_prompt="a sks dog")
    assert make_objective(flux, cfg, 32, torch.float32, "cpu").scheme == "none"
    objective = make_objective(sd3, cfg, 32, torch.float32, "cpu")
    assert objective.scheme == "logit_normal" and objective.precondition
    with pytest.raises(EtherError, match="--snr-gamma belong to DDPM training of UNet bases.*--weighting-scheme"):
        make_objective(flux, DreamBoothConfig(instance_dir="x", instance_prompt="y", snr_gamma=5.0), 32,
                       torch.float32, "cpu")


# -- exports judged by diffusers ------------------------------------------------------------------------------------

def denoiser_and_text(pipe, kind):
    """The transformer's output on fixed inputs, and the text conditioning (incl. the CLIP pooled embedding)."""
    cond = encode_text(pipe, ["a sks dog"], "cpu", 16)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if kind == "flux":
            out = pipe.transformer(hidden_states=pipe._pack_latents(x, 1, 4, 8, 8), timestep=torch.tensor([0.5]),
                                   guidance=None, pooled_projections=cond["pooled_projections"],
                                   encoder_hidden_states=cond["encoder_hidden_states"],
                                   txt_ids=torch.zeros(cond["encoder_hidden_states"].shape[1], 3),
                                   img_ids=pipe._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32)).sample
        else:
            out = pipe.transformer(hidden_states=x, timestep=torch.tensor([500.0]),
                                   encoder_hidden_states=cond["encoder_hidden_states"],
                                   pooled_projections=cond["pooled_projections"]).sample
    return [out, cond["pooled_projections"], cond["encoder_hidden_states"]]


@pytest.mark.parametrize("kind", KINDS)
def test_diffusers_loaders_reproduce_the_merged_model(dit, trained, kind):
    from diffusers import DiffusionPipeline

    run = trained[kind]
    ours = load_pipeline(str(dit / kind))
    load_ether_weights(ours, run / "ether_adapter.safetensors")
    merged = DiffusionPipeline.from_pretrained(run / "export-merged")
    lora = DiffusionPipeline.from_pretrained(dit / kind)
    lora.load_lora_weights(run / "export-lora")
    base = DiffusionPipeline.from_pretrained(dit / kind)
    want = denoiser_and_text(merged, kind)
    for got in (denoiser_and_text(ours, kind), denoiser_and_text(lora, kind)):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    plain = denoiser_and_text(base, kind)
    assert (plain[0] - want[0]).abs().max() > 1e-3 and (plain[1] - want[1]).abs().max() > 1e-4  # not vacuous


@pytest.mark.parametrize("kind", KINDS)
def test_lora_keys_are_diffusers_transformer_and_clip_keys(trained, kind):
    from safetensors import safe_open

    with safe_open(trained[kind] / "export-lora", "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    assert {k.split(".")[0] for k in keys} == {"transformer", "text_encoder"} | ({"text_encoder_2"} if kind == "sd3" else set())
    assert all(".text_model.encoder.layers." in k for k in keys if k.startswith("text_encoder"))


# FLUX.1's BFL layout, as ComfyUI's `flux_to_diffusers` map writes it down: (BFL weight, diffusers parts stacked)
BFL_DOUBLE = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"), "img_attn.proj": ("attn.to_out.0",),
              "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
              "txt_attn.proj": ("attn.to_add_out",), "img_mlp.0": ("ff.net.0.proj",), "img_mlp.2": ("ff.net.2",),
              "txt_mlp.0": ("ff_context.net.0.proj",), "txt_mlp.2": ("ff_context.net.2",)}
BFL_SINGLE = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "linear2": ("proj_out",)}


def bfl_weights(transformer) -> dict[str, torch.Tensor]:
    """A diffusers FLUX transformer's block weights in the BFL layout (fused by concatenation)."""
    out = {}
    for kind, blocks, table in (("double_blocks", transformer.transformer_blocks, BFL_DOUBLE),
                                ("single_blocks", transformer.single_transformer_blocks, BFL_SINGLE)):
        for i, block in enumerate(blocks):
            for bfl, parts in table.items():
                out[f"{kind}.{i}.{bfl}"] = torch.cat([block.get_submodule(p).weight.detach() for p in parts])
    return out


@pytest.fixture(scope="module")
def flux_attn_ff(dit, tmp_path_factory):
    """A FLUX adapter on attn+ff (every BFL target: fused q/k/v, single blocks' linear1 with its mlp part)."""
    from ether_diffusion.cli import main

    run = tmp_path_factory.mktemp("flux-ff")
    train_dreambooth(config(dit, "flux", run, targets="attn+ff", train_text_encoder=True))
    for to in ("kohya", "merged"):
        assert main(["export", str(run / "ether_adapter.safetensors"), "--base", str(dit / "flux"), "--to", to,
                     "--dtype", "fp32", "--out", str(run / f"export-{to}")]) == 0
    return run


def test_kohya_export_of_flux_is_the_bfl_layout_that_merges_to_the_adapted_weights(dit, flux_attn_ff):
    from diffusers import DiffusionPipeline
    from safetensors.torch import load_file

    lora = load_file(flux_attn_ff / "export-kohya")
    base = bfl_weights(DiffusionPipeline.from_pretrained(dit / "flux").transformer)
    merged_pipe = DiffusionPipeline.from_pretrained(flux_attn_ff / "export-merged")
    merged = bfl_weights(merged_pipe.transformer)
    modules = {k.rsplit(".", 2)[0] for k in lora if k.startswith("lora_unet_")}
    assert modules == {"lora_unet_" + k.replace(".", "_") for k in base}  # attn+ff reaches every block weight
    for name, weight in base.items():  # ComfyUI: W + up @ down · alpha / rank
        key = "lora_unet_" + name.replace(".", "_")
        up, down, alpha = lora[f"{key}.lora_up.weight"], lora[f"{key}.lora_down.weight"], lora[f"{key}.alpha"]
        torch.testing.assert_close(weight + up @ down * (alpha / down.shape[0]), merged[name], atol=1e-5, rtol=0)
    assert any((merged[k] - base[k]).abs().max() > 1e-3 for k in base)  # not vacuous
    te = {k for k in lora if not k.startswith("lora_unet_")}
    assert te and all(k.startswith("lora_te1_text_model_encoder_layers_") for k in te)  # ComfyUI's CLIP-L keys


def test_diffusers_reads_the_flux_kohya_export_back_into_the_merged_model(dit, tmp_path):
    """diffusers' own sd-scripts FLUX converter (fixed to FLUX.1's single-block widths, so double blocks here)."""
    from diffusers import DiffusionPipeline

    from ether_diffusion.cli import main

    double_only = r"transformer_blocks\.\d+\.attn\.(to_(q|k|v)|to_out\.0|add_(q|k|v)_proj|to_add_out)"
    train_dreambooth(config(dit, "flux", tmp_path, targets=double_only, train_text_encoder=True))
    for to in ("kohya", "merged"):
        assert main(["export", str(tmp_path / "ether_adapter.safetensors"), "--base", str(dit / "flux"), "--to", to,
                     "--dtype", "fp32", "--out", str(tmp_path / f"export-{to}.safetensors" if to == "kohya"
                                                      else tmp_path / "merged")]) == 0
    pipe = DiffusionPipeline.from_pretrained(dit / "flux")
    pipe.load_lora_weights(tmp_path / "export-kohya.safetensors")
    want = denoiser_and_text(DiffusionPipeline.from_pretrained(tmp_path / "merged"), "flux")
    for a, b in zip(denoiser_and_text(pipe, "flux"), want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_bfl_targets_of_full_size_flux_are_comfyui_keys():
    from ether_diffusion.flux_layout import bfl_target

    model = full_size("flux")
    reference = {f"double_blocks.{i}.{k}" for i in range(19) for k in BFL_DOUBLE}
    reference |= {f"single_blocks.{i}.{k}" for i in range(38) for k in BFL_SINGLE}
    got = {bfl_target(n)[0] for n in find_targets(model, "attn+ff")}
    assert got == reference
    assert {bfl_target(n)[0] for n in find_targets(model, "attn")} == {
        k for k in reference if k.endswith(("attn.qkv", "attn.proj", "linear1"))}
    assert bfl_target("proj_out") is None and bfl_target("transformer_blocks.0.norm1.linear") is None


# -- the command line -----------------------------------------------------------------------------------------------

def cli(*args):
    return subprocess.run([sys.executable, "-m", "ether_diffusion.cli", *map(str, args)], capture_output=True,
                          text=True, env=ENV)


def test_generate_works_as_printed_and_misfits_exit_2_in_one_line(dit, trained, tmp_path, capsys):
    from ether_diffusion.cli import main

    adapter = trained["flux"] / "ether_adapter.safetensors"
    done = cli("generate", "--base", dit / "flux", "--adapter", adapter, "--prompt", "a sks dog", "--steps", 2,
               "--height", 32, "--width", 32, "--scheduler", "FlowMatch Euler", "--out", tmp_path / "gen")
    assert done.returncode == 0, done.stderr[-2000:]
    assert Image.open(tmp_path / "gen" / "0-0.png").size == (32, 32)
    control_dir = tmp_path / "pairs"
    control_dir.mkdir()
    Image.new("RGB", (32, 32)).save(control_dir / "a.png")
    (control_dir / "metadata.jsonl").write_text(json.dumps({"image": "a.png", "conditioning_image": "a.png",
                                                            "text": "x"}) + "\n")
    for args, message in [
        (["export", trained["sd3"] / "ether_adapter.safetensors", "--base", dit / "sd3", "--to", "kohya", "--out",
          tmp_path / "k"], "no SD3 layout; use --to lora"),
        (["train", "control", "--base", dit / "flux", "--data-dir", control_dir, "--output-dir", tmp_path / "c",
          "--resolution", 32], "control training works on UNet bases"),
        (["train", "dreambooth", "--base", dit / "sd3", "--instance-dir", dit / "inst", "--instance-prompt", "a sks dog",
          "--output-dir", tmp_path / "d", "--resolution", 32, "--snr-gamma", 5], "--snr-gamma belong to DDPM"),
        (["generate", "--base", dit / "sd3", "--prompt", "a dog", "--scheduler", "Euler", "--out", tmp_path / "g"],
         "does not fit this SD3 base"),
        (["generate", "--base", dit / "sd3", "--adapter", adapter, "--prompt", "a dog", "--out", tmp_path / "g"],
         "made for another base model"),
    ]:
        capsys.readouterr()
        assert main([str(a) for a in args]) == 2
        err = capsys.readouterr().err  # (in process, model-loading bars share stderr; the error is its last line)
        last = err.strip().splitlines()[-1]
        assert last.startswith("error: ") and message in last and "Traceback" not in err, err[-2000:]


def test_the_app_serves_a_flux_base_with_its_own_solver_only(dit, trained, tmp_path):
    import shutil

    from ether_diffusion.studio import Request, Studio

    (tmp_path / "adapters").mkdir()
    shutil.copy(trained["flux"] / "ether_adapter.safetensors", tmp_path / "adapters" / "dog.safetensors")
    studio = Studio(load_pipeline(str(dit / "flux")), tmp_path / "adapters")
    assert studio.schedulers == ["FlowMatch Euler"] and studio.size_multiple == 8
    name = studio.list_adapters()[0]
    request = Request(prompt="a sks dog", steps=2, guidance=3.5, scheduler="FlowMatch Euler", size=32, mode="compare")
    (adapted, _), (plain, _) = studio.run(request, [(name, 1.0)])
    assert adapted.size == (32, 32) and adapted.tobytes() != plain.tobytes()
    with pytest.raises(EtherError, match="does not fit this FLUX base"):
        studio.run(Request(prompt="a dog", scheduler="DPM++ 2M", size=32), [])


def test_two_processes_train_a_flux_adapter(dit, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU: two gloo processes, one writer."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--multi_gpu", "--num_processes", "2", "-m", "ether_diffusion.cli", "train",
           "dreambooth", "--base", str(dit / "flux"), "--instance-dir", str(dit / "inst"), "--instance-prompt",
           "a sks dog", "--output-dir", str(out), "--resolution", "32", "--max-sequence-length", "16",
           "--max-steps", "2", "--checkpointing-steps", "2"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("adapter written to") == 1
    assert json.loads((out / "training_summary.json").read_text())["processes"] == 2


def test_the_diffusers_sd3_script_command_trains_the_layers_it_names(dit, tmp_path):
    """`train_dreambooth_lora_sd3.py`'s flags, with `--lora_layers` / `--lora_blocks` becoming the targets."""
    from ether_diffusion.adapter_file import read_adapter_file
    from ether_diffusion.train.diffusers_flags import main

    out = tmp_path / "out"
    argv = [f"--pretrained_model_name_or_path={dit / 'sd3'}", f"--instance_data_dir={dit / 'inst'}",
            f"--output_dir={out}", "--instance_prompt=a photo of sks dog", "--resolution=32", "--train_batch_size=1",
            "--learning_rate=1e-2", "--lr_scheduler=constant", "--max_train_steps=2", "--weighting_scheme=mode",
            "--mode_scale=1.29", "--max_sequence_length=16", "--precondition_outputs=0",
            "--lora_layers=attn.to_k,attn.to_q", "--lora_blocks=1", "--seed=0"]
    assert main(argv) == 0
    saved = json.loads((out / "training_config.json").read_text())
    assert saved["weighting_scheme"] == "mode" and saved["precondition_outputs"] is False
    layers = read_adapter_file(out / "ether_adapter.safetensors").components["transformer"]["layers"]
    assert sorted(layers) == ["transformer_blocks.1.attn.to_k", "transformer_blocks.1.attn.to_q"]
    assert main([*argv[:-3], "--lora_layers=attn.to_k", "--targets=attn"]) == 2


def nf4(linear: torch.nn.Module) -> torch.nn.Module:
    """bitsandbytes' nf4 Linear4bit holding `linear`'s weight (quantised on CPU; diffusers' own nf4 loading
    insists on a GPU, the layer does not)."""
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          compute_dtype=torch.float32, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4")
    if linear.bias is not None:
        q.bias = torch.nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return q.to("cpu")


def test_ether_trains_on_an_nf4_quantised_flux_transformer(dit, tmp_path):
    pytest.importorskip("bitsandbytes")
    from ether_diffusion.inject import _replace, adapter_modules

    pipe = load_pipeline(str(dit / "flux"))
    names = find_targets(pipe.transformer, "attn")
    for name in names:
        _replace(pipe.transformer, name, nf4(pipe.transformer.get_submodule(name)))
    packed = {n: pipe.transformer.get_submodule(n).weight.data.clone() for n in names}
    cfg = config(dit, "flux", tmp_path, max_steps=3, checkpointing_steps=3)
    train_dreambooth(cfg, pipe=pipe)
    summary = json.loads((tmp_path / "training_summary.json").read_text())
    assert summary["final_loss"] == summary["final_loss"]  # finite, not NaN
    layers = adapter_modules(pipe.transformer, "default")
    assert sorted(layers) == sorted(names)
    assert all(type(pipe.transformer.get_submodule(n).base).__name__ == "Linear4bit" for n in names)
    assert all(torch.equal(pipe.transformer.get_submodule(n).base.weight.data, packed[n]) for n in names)  # frozen
    from ether_diffusion.adapter_file import read_adapter_file

    assert read_adapter_file(tmp_path / "ether_adapter.safetensors").components["transformer"]["layers"]
