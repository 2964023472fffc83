"""Control adapters on tiny pipelines: the zero-initialised encoder, strengths, file round trip, refusals,
composition with a subject adapter, dataset validation, training (loss falls, exact resume), CLI and export."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from ether_diffusion import AdapterConfig, EtherError, add_adapter
from ether_diffusion.adapter_file import AdapterFileError, describe, read_adapter_file, save_adapter
from ether_diffusion.cli import main as cli_main
from ether_diffusion.control import attach_control, build_encoder, control_image, encoder_config, prepare_control_image
from ether_diffusion.data import load_control_folder
from ether_diffusion.pipelines import generate, load_ether_weights, set_ether_adapters, unload_ether_weights
from ether_diffusion.testing import tiny_sd_pipeline, write_adapter_tensors
from ether_diffusion.toyworld import world
from ether_diffusion.toyworld.control_data import write_control_dataset
from ether_diffusion.train import ControlConfig, train_control
from ether_diffusion.train.common import diffusion_loss, noisy_latents_and_target

HINT = world.render_segmentation(world.Scene("square", ("red",), "white", "large", 20.0, 40.0, 14.0))
ARGS = dict(seed=3, steps=3, guidance=5.0)


def _randomise(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _encoder(pipe, trained: bool = True, seed: int = 1):
    config = encoder_config(pipe.unet, pipe.vae_scale_factor)
    encoder = build_encoder(config)
    if trained:
        _randomise(encoder, seed)
    return config, encoder


def _control_file(tmp_path: Path, name: str = "ctl", with_vectors: bool = True, seed: int = 1) -> Path:
    pipe = tiny_sd_pipeline()
    config, encoder = _encoder(pipe, seed=seed)
    if with_vectors:
        add_adapter(pipe.unet, name, AdapterConfig(method="etherplus", targets="attn+ff"))
        for module in pipe.unet.modules():
            if hasattr(module, "vectors"):
                _randomise(module, seed + 1)
    return save_adapter(tmp_path / f"{name}.safetensors", {"unet": pipe.unet}, name,
                        control=("segmentation", config, encoder))


def _same(a, b) -> bool:
    return all(torch.equal(torch.tensor(list(x.getdata())), torch.tensor(list(y.getdata()))) for x, y in zip(a, b))


def test_zero_initialised_encoder_leaves_the_base_model_unchanged():
    pipe = tiny_sd_pipeline()
    base = generate(pipe, "a red square", **ARGS)
    config, encoder = _encoder(pipe, trained=False)
    attach_control(pipe.unet, "ctl", encoder, "segmentation")
    assert _same(generate(pipe, "a red square", control_image=HINT, **ARGS), base)


def test_trained_encoder_changes_the_output_and_strength_zero_is_the_base():
    pipe = tiny_sd_pipeline()
    base = generate(pipe, "a red square", **ARGS)
    attach_control(pipe.unet, "ctl", _encoder(pipe)[1], "segmentation")
    controlled = generate(pipe, "a red square", control_image=HINT, **ARGS)
    assert not _same(controlled, base)
    other_map = generate(pipe, "a red square", control_image=HINT.transpose(Image.Transpose.FLIP_TOP_BOTTOM), **ARGS)
    assert not _same(other_map, controlled)
    set_ether_adapters(pipe, ["ctl"], [0.0])
    assert _same(generate(pipe, "a red square", **ARGS), base)


def test_control_image_is_resized_and_the_batch_follows_guidance():
    pipe = tiny_sd_pipeline()
    attach_control(pipe.unet, "ctl", _encoder(pipe)[1], "segmentation")
    hint = prepare_control_image(HINT, 32, 32)
    assert hint.shape == (1, 3, 32, 32) and 0 <= hint.min() and hint.max() <= 1
    latents = torch.randn(4, 4, 8, 8)
    with torch.no_grad(), control_image(pipe.unet, hint):
        out = pipe.unet.conv_in(latents)  # a batch of 4 (CFG-doubled 2) with one control image
    with torch.no_grad():
        plain = pipe.unet.conv_in(latents)
    assert not torch.equal(out, plain)
    torch.testing.assert_close(out[0] - plain[0], out[3] - plain[3])


def test_adapter_file_round_trip_and_info(tmp_path):
    path = _control_file(tmp_path)
    parsed = read_adapter_file(path)
    assert parsed.control["kind"] == "segmentation"
    assert "needs a segmentation control image" in describe(parsed)
    reference = tiny_sd_pipeline()
    config, encoder = _encoder(reference)
    add_adapter(reference.unet, "ctl", AdapterConfig(method="etherplus", targets="attn+ff"))
    for module in reference.unet.modules():
        if hasattr(module, "vectors"):
            _randomise(module, 2)
    attach_control(reference.unet, "ctl", encoder, "segmentation")
    expected = generate(reference, "a red square", control_image=HINT, **ARGS)

    pipe = tiny_sd_pipeline()
    load_ether_weights(pipe, path)
    assert _same(generate(pipe, "a red square", control_image=HINT, **ARGS), expected)
    with pytest.raises(EtherError, match=r"need a control image: ctl \(segmentation\)"):
        generate(pipe, "a red square", **ARGS)
    unload_ether_weights(pipe)
    with pytest.raises(EtherError, match="no control adapter is active"):
        generate(pipe, "a red square", control_image=HINT, **ARGS)


def test_files_that_do_not_fit_are_refused(tmp_path):
    pipe = tiny_sd_pipeline()
    wrong = {"conditioning_embedding_channels": 48, "conditioning_channels": 3, "block_out_channels": [16, 32, 96]}
    path = save_adapter(tmp_path / "wide.safetensors", {"unet": pipe.unet}, "wide",
                        control=("edges", wrong, build_encoder(wrong)))
    with pytest.raises(AdapterFileError, match="gives 48 channels, this UNet's conv_in gives 32"):
        load_ether_weights(tiny_sd_pipeline(), path)

    good = _control_file(tmp_path)
    with safe_open(str(good), "pt") as fh:
        meta = fh.metadata()["ether_diffusion"]
    tensors = {k: v for k, v in load_file(good).items() if not k.startswith("extra.")}
    write_adapter_tensors(tmp_path / "no-encoder.safetensors", tensors, meta)
    with pytest.raises(AdapterFileError, match=r"missing \['extra.control_encoder"):
        read_adapter_file(tmp_path / "no-encoder.safetensors")
    tensors = load_file(good)
    tensors["extra.control_encoder.conv_out.weight"] = tensors["extra.control_encoder.conv_out.weight"][:, :5].contiguous()
    write_adapter_tensors(tmp_path / "bad-shape.safetensors", tensors, meta)
    with pytest.raises(AdapterFileError, match="extra.control_encoder.conv_out.weight has shape"):
        load_ether_weights(tiny_sd_pipeline(), tmp_path / "bad-shape.safetensors")


def test_subject_and_control_adapters_compose_with_their_own_strengths(tmp_path):
    control_path = _control_file(tmp_path, "ctl")
    subject = tiny_sd_pipeline()
    add_adapter(subject.unet, "subj", AdapterConfig(method="ether"))
    for module in subject.unet.modules():
        if hasattr(module, "vectors"):
            _randomise(module, 7)
    subject_path = save_adapter(tmp_path / "subj.safetensors", {"unet": subject.unet}, "subj")

    def pipe_with(*paths):
        pipe = tiny_sd_pipeline()
        for p in paths:
            load_ether_weights(pipe, p)
        return pipe

    subject_only = generate(pipe_with(subject_path), "a sks circle", **ARGS)
    control_only = generate(pipe_with(control_path), "a sks circle", control_image=HINT, **ARGS)
    both = pipe_with(subject_path, control_path)
    together = generate(both, "a sks circle", control_image=HINT, **ARGS)
    assert not _same(together, subject_only) and not _same(together, control_only)
    set_ether_adapters(both, ["subj", "ctl"], [1.0, 0.0])
    assert _same(generate(both, "a sks circle", **ARGS), subject_only)
    set_ether_adapters(both, ["subj", "ctl"], [0.0, 1.0])
    assert _same(generate(both, "a sks circle", control_image=HINT, **ARGS), control_only)
    set_ether_adapters(both, ["subj", "ctl"], [1.0, 0.5])
    half = generate(both, "a sks circle", control_image=HINT, **ARGS)
    assert not _same(half, together) and not _same(half, subject_only)


def test_dataset_rows_are_checked_and_bad_ones_named(tmp_path):
    folder = tmp_path / "data"
    write_control_dataset(folder, "segmentation", 3)
    assert len(load_control_folder(folder)) == 3
    Image.new("RGB", (20, 20)).save(folder / "small.png")
    (folder / "broken.png").write_bytes(b"not a png")
    rows = (folder / "metadata.jsonl").read_text().splitlines()
    rows += [json.dumps({"image": "images/00000.png", "conditioning_image": "gone.png", "text": "x"}),
             json.dumps({"image": "images/00000.png", "conditioning_image": "small.png", "text": "x"}),
             json.dumps({"image": "broken.png", "conditioning_image": "small.png", "text": "x"}),
             "{not json", json.dumps({"image": "images/00000.png"})]
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    with pytest.raises(EtherError) as err:
        load_control_folder(folder)
    message = str(err.value)
    for expected in ("row 4: conditioning_image file not found: gone.png", "row 5: image is 64×64 but "
                     "conditioning_image is 20×20", "row 6: image is not a readable image", "row 7: not valid JSON",
                     "row 8: needs string fields"):
        assert expected in message
    with pytest.raises(EtherError, match="no metadata.jsonl"):
        load_control_folder(tmp_path)


@pytest.fixture
def pairs(tmp_path):
    folder = tmp_path / "pairs"
    write_control_dataset(folder, "segmentation", 16, seed=5)
    return folder


def _control_cfg(pairs, out, **kw):
    settings = dict(data_dir=str(pairs), output_dir=str(out), max_steps=4, train_batch_size=4,
                    checkpointing_steps=100, validation_inference_steps=2, validation_rows=2)
    settings.update(kw)
    return ControlConfig(**settings)


def _fixed_batch_loss(pipe, pairs) -> float:
    """Diffusion loss of the current model on fixed pairs, noise and timesteps (control images included)."""
    from diffusers import DDPMScheduler

    from ether_diffusion.train.common import encode_text
    from ether_diffusion.train.control import control_tensor

    rows = load_control_folder(pairs)
    g = torch.Generator().manual_seed(0)
    pixels = torch.stack([torch.from_numpy(np.asarray(r.image.resize((32, 32)), np.float32)).permute(2, 0, 1)
                          / 127.5 - 1 for r in rows])
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        noisy, t, target = noisy_latents_and_target(scheduler, latents.repeat(4, 1, 1, 1), g)
        hints = torch.stack([control_tensor(r, 32) for r in rows]).repeat(4, 1, 1, 1)
        cond = encode_text(pipe, [r.caption for r in rows] * 4, "cpu")["encoder_hidden_states"]
        with control_image(pipe.unet, hints):
            pred = pipe.unet(noisy, t, encoder_hidden_states=cond).sample
    return float(diffusion_loss(pred, target).mean())


@pytest.mark.parametrize("injection", ["conv_in", "multiscale"])
def test_short_training_lowers_the_loss_and_writes_the_adapter(pairs, tmp_path, injection):
    pipe = tiny_sd_pipeline()
    cfg = _control_cfg(pairs, tmp_path / "run", max_steps=40, learning_rate=1e-2, encoder_learning_rate=1e-3,
                       validation_steps=40, control_injection=injection)
    before = _fixed_batch_loss_with_zero_encoder(pairs)
    path = train_control(cfg, pipe=pipe)
    after = _fixed_batch_loss(pipe, pairs)
    assert after < 0.95 * before, (before, after)  # measured: 0.88x (conv_in), 0.92x (multiscale) in 40 steps
    parsed = read_adapter_file(path)
    assert parsed.control["kind"] == "segmentation" and parsed.metadata["training"]["steps"] == 40
    assert parsed.control["encoder"].get("injection", "conv_in") == injection
    assert (tmp_path / "run" / "validation" / "step-000040.png").is_file()


def _fixed_batch_loss_with_zero_encoder(pairs) -> float:
    pipe = tiny_sd_pipeline()
    attach_control(pipe.unet, "zero", _encoder(pipe, trained=False)[1], "segmentation")
    return _fixed_batch_loss(pipe, pairs)


def test_resumed_run_ends_with_the_same_encoder_and_vectors(pairs, tmp_path):
    straight = train_control(_control_cfg(pairs, tmp_path / "a", max_steps=4), pipe=tiny_sd_pipeline())
    train_control(_control_cfg(pairs, tmp_path / "b", max_steps=2, checkpointing_steps=2), pipe=tiny_sd_pipeline())
    resumed = train_control(_control_cfg(pairs, tmp_path / "b", max_steps=4, resume_from_checkpoint="latest"),
                            pipe=tiny_sd_pipeline())
    a, b = load_file(straight), load_file(resumed)
    assert a.keys() == b.keys() and any(k.startswith("extra.control_encoder.") for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)


def test_cli_trains_generates_and_exports(pairs, tmp_path, capsys):
    out = tmp_path / "cli"
    base = tmp_path / "base"
    tiny_sd_pipeline().save_pretrained(base)
    assert cli_main(["train", "control", "--data-dir", str(pairs), "--output-dir", str(out), "--base", str(base),
                     "--max-steps", "2", "--train-batch-size", "2", "--control-kind", "segmentation",
                     "--control-injection", "conv_in"]) == 0  # the paper's encoder: a diffusers class on export
    adapter = out / "ether_control.safetensors"
    HINT.save(tmp_path / "hint.png")
    assert cli_main(["generate", "--prompt", "a red square", "--out", str(tmp_path / "gen"), "--base", str(base),
                     "--adapter", str(adapter), "--control-image", str(tmp_path / "hint.png"), "--steps", "2"]) == 0
    assert (tmp_path / "gen" / "0-0.png").is_file()
    assert cli_main(["generate", "--prompt", "a red square", "--out", str(tmp_path / "gen"), "--base", str(base),
                     "--adapter", str(adapter), "--steps", "2"]) == 2
    assert "need a control image" in capsys.readouterr().err
    assert cli_main(["export", f"{adapter}:0.5", "--to", "lora", "--out", str(tmp_path / "lora.safetensors"),
                     "--base", str(base)]) == 0
    encoder_file = tmp_path / "lora.control_encoder.safetensors"
    with safe_open(str(encoder_file), "pt") as fh:
        meta = fh.metadata()
    from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding

    rebuilt = ControlNetConditioningEmbedding(**{k: tuple(v) if isinstance(v, list) else v
                                                 for k, v in json.loads(meta["config"]).items()})
    rebuilt.load_state_dict(load_file(encoder_file))
    stored = read_adapter_file(adapter).extra_tensors("control_encoder")
    torch.testing.assert_close(rebuilt.conv_out.weight, 0.5 * stored["conv_out.weight"])
    assert cli_main(["train", "control", "--data-dir", str(tmp_path / "nowhere"), "--output-dir", str(out)]) == 2


def test_train_control_without_rate_flags_uses_the_rate_that_follows_the_map(tmp_path):
    """What a user gets with no --learning-rate: 1e-1 for the adapters (1e-3 controls nothing on the embedded
    base, docs/control.md), 1e-4 for the encoder; the resolved values are saved with the run."""
    from ether_diffusion.cli import main as cli_main

    write_control_dataset(tmp_path / "pairs", "segmentation", 2)
    assert cli_main(["train", "control", "--data-dir", str(tmp_path / "pairs"), "--output-dir", str(tmp_path / "o"),
                     "--max-steps", "1", "--train-batch-size", "1", "--checkpointing-steps", "1"]) == 0
    saved = json.loads((tmp_path / "o" / "training_config.json").read_text())
    assert (saved["learning_rate"], saved["encoder_learning_rate"]) == (0.1, 1e-4)


def test_train_control_budget_without_flags_is_the_measured_one(monkeypatch, tmp_path):
    """What a user gets with no --max-steps / --train-batch-size: 2,400 steps of batch 8, the budget measured to
    reach both IoU targets on the embedded base (docs/control.md); the flags still override it."""
    from ether_diffusion.cli import main as cli_main
    from ether_diffusion.train import control

    seen = []
    monkeypatch.setattr(control, "train_control", lambda cfg: seen.append(cfg) or tmp_path / "a.safetensors")
    base = ["train", "control", "--data-dir", str(tmp_path), "--output-dir", str(tmp_path / "o")]
    assert cli_main(base) in (0, None)
    assert cli_main([*base, "--max-steps", "600", "--train-batch-size", "4"]) in (0, None)
    assert [(c.max_steps, c.train_batch_size, c.learning_rate) for c in seen] == [(2400, 8, 0.1), (600, 4, 0.1)]
