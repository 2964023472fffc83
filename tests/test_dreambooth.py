"""DreamBooth training on tiny pipelines: learning, exact resume, prior preservation, SDXL, v-prediction,
input errors, the CLI, and a real 2-process DDP run."""

import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ether_diffusion import AdapterConfig, EtherError, add_adapter
from ether_diffusion.testing import tiny_sd_pipeline, tiny_sdxl_pipeline
from ether_diffusion.toyworld import world
from ether_diffusion.train import DreamBoothConfig, train_dreambooth
from ether_diffusion.train.common import (
    diffusion_loss,
    min_snr_weights,
    noisy_latents_and_target,
    step_generator,
    timestep_weights,
)


@pytest.fixture
def instance_dir(tmp_path):
    folder = tmp_path / "instance"
    folder.mkdir()
    rng = random.Random(0)
    for i in range(3):
        world.render(world.subject_scene(rng, "striped-circle", "white")).resize((32, 32)).save(folder / f"{i}.png")
    return folder


def config(instance_dir, out, **kw):
    base = dict(instance_dir=str(instance_dir), instance_prompt="a sks circle", output_dir=str(out), max_steps=4,
                checkpointing_steps=100, validation_inference_steps=2, class_generation_steps=2)
    base.update(kw)
    return DreamBoothConfig(**base)


def test_loss_falls_on_a_fixed_batch():
    pipe = tiny_sd_pipeline()
    add_adapter(pipe.unet, "a", AdapterConfig(method="etherplus", n_blocks=4))
    params = [p for p in pipe.unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=6e-3)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    cond = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(2))
    losses = []
    for _ in range(50):
        noisy, t, target = noisy_latents_and_target(pipe.scheduler, latents, step_generator(0, 0))
        loss = diffusion_loss(pipe.unet(noisy, t, cond).sample, target).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_resume_ends_with_the_same_adapter(instance_dir, tmp_path):
    full = tmp_path / "full"
    kw = dict(max_steps=6, checkpointing_steps=3, method="etherplus", n_blocks=2, train_text_encoder=True)
    train_dreambooth(config(instance_dir, full, **kw), pipe=tiny_sd_pipeline())
    assert (full / "checkpoint-3" / "state.json").is_file()
    # a run killed after step 3: only its checkpoint survives
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    shutil.copytree(full / "checkpoint-3", interrupted / "checkpoint-3")
    train_dreambooth(config(instance_dir, interrupted, resume_from_checkpoint="latest", **kw), pipe=tiny_sd_pipeline())
    a = load_file(full / "ether_adapter.safetensors")
    b = load_file(interrupted / "ether_adapter.safetensors")
    assert a.keys() == b.keys() and any(k.startswith("text_encoder.") for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
    summary = json.loads((interrupted / "training_summary.json").read_text())
    assert summary["resumed_from_step"] == 3
    # and training moved the vectors away from the initial ones in the checkpoint
    c = load_file(full / "checkpoint-3" / "adapter.safetensors")
    for part in ("unet.", "text_encoder."):
        assert any(not torch.equal(a[k], c[k]) for k in a if k.startswith(part)), part


def test_prior_preservation_generates_only_missing_class_images(instance_dir, tmp_path):
    class_dir = tmp_path / "class"
    class_dir.mkdir()
    Image.new("RGB", (32, 32), "white").save(class_dir / "mine.png")
    cfg = config(instance_dir, tmp_path / "out", with_prior_preservation=True, class_prompt="a circle",
                 class_dir=str(class_dir), num_class_images=3, sample_batch_size=2)
    train_dreambooth(cfg, pipe=tiny_sd_pipeline())
    made = sorted(p.name for p in class_dir.iterdir())
    assert made == ["class-00000.png", "class-00001.png", "mine.png"]
    stamps = {p.name: p.stat().st_mtime_ns for p in class_dir.iterdir()}
    train_dreambooth(cfg, pipe=tiny_sd_pipeline())
    assert {p.name: p.stat().st_mtime_ns for p in class_dir.iterdir()} == stamps
    meta = json.loads(__import__("safetensors").safe_open(str(tmp_path / "out" / "ether_adapter.safetensors"), "pt")
                      .metadata()["ether_diffusion"])
    assert meta["trigger"] == "sks" and meta["training"]["prior_preservation"] is True


def moved_layers(tensors: dict, component: str) -> tuple[int, int]:
    """(layers whose ETHER+ u and v now differ, layers) of a component: both start equal, so a difference means
    gradients reached that layer."""
    layers = {k.rsplit(".", 1)[0] for k in tensors if k.startswith(component + ".")}
    moved = sum(not torch.equal(tensors[f"{layer}.u_input"], tensors[f"{layer}.v_input"]) for layer in layers)
    return moved, len(layers)


def test_sdxl_trains_every_component(instance_dir, tmp_path):
    """SDXL: the pooled text embedding and size ids reach the UNet and gradients reach all three components."""
    out = tmp_path / "xl"
    path = train_dreambooth(config(instance_dir, out, train_text_encoder=True), pipe=tiny_sdxl_pipeline())
    tensors = load_file(path)
    for component in ("unet", "text_encoder_2"):
        moved, total = moved_layers(tensors, component)
        assert total and moved == total, (component, moved, total)
    # SDXL conditions on the first text encoder's penultimate layer: its last layer gets no gradient
    last = tiny_sdxl_pipeline().text_encoder.config.num_hidden_layers - 1
    inner = {k: v for k, v in tensors.items() if f"layers.{last}." not in k}
    moved, total = moved_layers(inner, "text_encoder")
    assert total and moved == total, (moved, total)
    assert moved_layers(tensors, "text_encoder")[0] == total


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_training_target_matches_the_prediction_type(kind):
    """The target against an fp64 re-derivation: ε, or v = √ᾱ·ε − √(1−ᾱ)·x₀ for v-prediction."""
    pipe = tiny_sd_pipeline(prediction_type=kind)
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    noisy, t, target = noisy_latents_and_target(pipe.scheduler, latents, step_generator(0, 5))
    g = step_generator(0, 5)
    noise = torch.randn(latents.shape, generator=g, dtype=torch.float32).double()
    alpha = pipe.scheduler.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    assert torch.allclose(noisy.double(), alpha.sqrt() * latents.double() + (1 - alpha).sqrt() * noise, atol=1e-5)
    want = noise if kind == "epsilon" else alpha.sqrt() * noise - (1 - alpha).sqrt() * latents.double()
    assert torch.allclose(target.double(), want, atol=1e-5)


@pytest.mark.parametrize("strategy", ["later", "earlier", "range"])
def test_timestep_bias_weights_follow_diffusers_sdxl_scripts(strategy):
    """Against the formula of diffusers' `generate_timestep_weights`: ones, the biased slice times the multiplier,
    normalised; and the sampled timesteps land in the biased slice as often as those weights say."""
    cfg = DreamBoothConfig(timestep_bias_strategy=strategy, timestep_bias_multiplier=3.0, timestep_bias_portion=0.2,
                           timestep_bias_begin=100, timestep_bias_end=300)
    want = [1.0] * 1000
    biased = {"later": range(800, 1000), "earlier": range(0, 200), "range": range(100, 300)}[strategy]
    for i in biased:
        want[i] = 3.0
    weights = timestep_weights(cfg, 1000)
    assert torch.allclose(weights.double(), torch.tensor(want, dtype=torch.float64) / sum(want))
    pipe = tiny_sd_pipeline()
    latents = torch.zeros(4000, 4, 1, 1)
    _, t, _ = noisy_latents_and_target(pipe.scheduler, latents, step_generator(0, 1), weights=weights)
    share = sum(int(v) in biased for v in t) / len(t)
    assert abs(share - 0.6 / 1.4) < 0.03  # 200 timesteps × 3 of 800 + 600
    assert timestep_weights(DreamBoothConfig(), 1000) is None  # the default samples uniformly, as before


def test_timestep_bias_settings_are_checked_before_training(instance_dir, tmp_path):
    for bad, problem in ((dict(timestep_bias_strategy="late"), "timestep_bias_strategy"),
                         (dict(timestep_bias_multiplier=0.0), "multiplier"),
                         (dict(timestep_bias_portion=1.5), "portion")):
        with pytest.raises(EtherError, match=problem):
            config(instance_dir, tmp_path / "x", **bad).validate()


def test_a_later_bias_trains_and_peft_parameters_in_the_text_encoder_train_too(instance_dir, tmp_path):
    """Extra (benchmark) parameters inside the text encoder are not frozen with it, and its outputs are not
    cached while they train."""
    pipe = tiny_sd_pipeline()
    layer = next(m for n, m in pipe.text_encoder.named_modules() if n.endswith("q_proj"))
    before = layer.weight.detach().clone()
    extra = [layer.weight]
    train_dreambooth(config(instance_dir, tmp_path / "t", train_adapters=False, train_text_encoder=True,
                            timestep_bias_strategy="later", timestep_bias_multiplier=5.0), pipe=pipe,
                     extra_trainable=extra)
    assert not torch.equal(layer.weight, before)


def test_v_prediction_base_trains_with_min_snr(instance_dir, tmp_path):
    pipe = tiny_sd_pipeline(prediction_type="v_prediction")
    path = train_dreambooth(config(instance_dir, tmp_path / "v", snr_gamma=5.0, method="etherplus"), pipe=pipe)
    moved, total = moved_layers(load_file(path), "unet")
    assert moved == total > 0
    t = torch.tensor([10, 500, 990])
    alpha = pipe.scheduler.alphas_cumprod[t].double()
    snr = alpha / (1 - alpha)
    assert torch.allclose(min_snr_weights(pipe.scheduler, t, 5.0).double(), snr.clamp(max=5.0) / (snr + 1))


def test_gradient_checkpointing_is_on_and_changes_nothing_but_memory(instance_dir, tmp_path):
    plain = train_dreambooth(config(instance_dir, tmp_path / "a", method="etherplus"), pipe=tiny_sd_pipeline())
    pipe = tiny_sd_pipeline()
    checkpointed = train_dreambooth(config(instance_dir, tmp_path / "b", method="etherplus",
                                           gradient_checkpointing=True), pipe=pipe)
    assert pipe.unet.is_gradient_checkpointing
    a, b = load_file(plain), load_file(checkpointed)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)


def test_latent_cache_encodes_each_picture_once_and_trains_the_same(instance_dir, tmp_path):
    plain = train_dreambooth(config(instance_dir, tmp_path / "a", method="etherplus", max_steps=6),
                             pipe=tiny_sd_pipeline())
    pipe = tiny_sd_pipeline()
    calls = []
    real_encode = pipe.vae.encode
    pipe.vae.encode = lambda x, *a, **k: calls.append(x.shape[0]) or real_encode(x, *a, **k)
    cached = train_dreambooth(config(instance_dir, tmp_path / "b", method="etherplus", max_steps=6,
                                     cache_latents=True), pipe=pipe)
    assert sum(calls) == 3  # three instance pictures, six steps
    a, b = load_file(plain), load_file(cached)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("cache", [False, True])
def test_random_flip_shows_both_orientations_and_is_off_by_default(tmp_path, cache):
    from ether_diffusion.data import Example
    from ether_diffusion.train.loop import LatentSource

    pipe = tiny_sd_pipeline()
    picture = Image.new("RGB", (32, 32), "blue")
    picture.paste(Image.new("RGB", (16, 32), "red"), (0, 0))  # red on the left: a flip puts blue there
    examples = [Example(tmp_path / "x.png", picture, "x")]
    for flip, expected in ((False, {"red"}), (True, {"red", "blue"})):
        source = LatentSource(pipe, examples, 32, "cpu", cache=cache, random_flip=flip)
        seen = set()
        zero = torch.zeros(1, 4, 4, 4)
        if cache:  # which cached variant a step takes
            source.cache = {(0, False): (zero, zero), (0, True): (zero + 1, zero)}
        else:  # which picture reaches the encoder: red or blue at the top-left pixel
            source._posterior = lambda pixels: (zero + float(pixels[0, 0, 0, 0] > 0), zero)
        for step in range(16):
            lit = abs(float(source.latents([0], torch.Generator().manual_seed(step)).mean())) > 1e-6
            seen.add("red" if lit != cache else "blue")  # cache: the flipped variant is the lit one
        assert seen == expected, (flip, seen)


def test_symlinked_pictures_are_read_and_dangling_links_skipped(tmp_path):
    from ether_diffusion.data import load_folder

    store, folder = tmp_path / "store", tmp_path / "instance"
    store.mkdir()
    folder.mkdir()
    Image.new("RGB", (32, 32), "red").save(store / "dog.png")
    (folder / "dog.png").symlink_to(store / "dog.png")
    (folder / "gone.png").symlink_to(store / "gone.png")
    with pytest.warns(UserWarning, match="gone.png"):
        examples = load_folder(folder, "a sks dog")
    assert [e.path.name for e in examples] == ["dog.png"] and examples[0].image.getpixel((0, 0)) == (255, 0, 0)


def test_bad_inputs(instance_dir, tmp_path):
    with pytest.raises(EtherError, match="instance folder not found"):
        train_dreambooth(config(tmp_path / "nope", tmp_path / "o"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.md").write_text("hi")
    with pytest.warns(UserWarning, match="notes.md: not an image file"), pytest.raises(EtherError, match="no usable"):
        train_dreambooth(config(empty, tmp_path / "o"))
    with pytest.raises(EtherError, match="multiple of 8"):
        train_dreambooth(config(instance_dir, tmp_path / "o", resolution=30))
    with pytest.raises(EtherError, match=r"not divisible by n_blocks=3"):
        train_dreambooth(config(instance_dir, tmp_path / "o", n_blocks=3), pipe=tiny_sd_pipeline())


def test_corrupt_jpeg_is_skipped_with_a_warning(instance_dir, tmp_path):
    (instance_dir / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.warns(UserWarning, match="broken.jpg: not a readable image"):
        train_dreambooth(config(instance_dir, tmp_path / "o", max_steps=1), pipe=tiny_sd_pipeline())


def _cli(*args, cwd=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "ether_diffusion.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)


def test_cli_trains_resumes_and_writes_everything(instance_dir, tiny_pipe_dir, tmp_path):
    out = tmp_path / "cli"
    common = ["train", "dreambooth", "--base", str(tiny_pipe_dir), "--instance-dir", str(instance_dir),
              "--instance-prompt", "a sks circle", "--output-dir", str(out), "--checkpointing-steps", "2",
              "--validation-steps", "2", "--validation-inference-steps", "2", "--num-validation-images", "1"]
    cfg_file = tmp_path / "run.toml"
    cfg_file.write_text('method = "ether"\nn-blocks = 2\nmax_steps = 99\n')
    first = _cli(*common, "--config", str(cfg_file), "--max-steps", "2")
    assert first.returncode == 0, first.stderr
    second = _cli(*common, "--config", str(cfg_file), "--max-steps", "4", "--resume-from-checkpoint", "latest")
    assert second.returncode == 0, second.stderr
    assert "resuming from" in second.stdout
    for name in ("ether_adapter.safetensors", "README.md", "training_config.json", "validation/step-000004.png"):
        assert (out / name).is_file(), name
    resolved = json.loads((out / "training_config.json").read_text())
    assert resolved["method"] == "ether" and resolved["n_blocks"] == 2 and resolved["max_steps"] == 4
    info = _cli("info", str(out / "ether_adapter.safetensors"))
    assert info.returncode == 0 and "method=ether n_blocks=2" in info.stdout and "instance_prompt: a sks circle" in info.stdout


def test_cli_user_errors_exit_2_with_one_line(tmp_path):
    missing = _cli("train", "dreambooth", "--instance-dir", str(tmp_path / "none"), "--instance-prompt", "x",
                   "--output-dir", str(tmp_path / "o"))
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines()[-1].startswith("error: instance folder not found")
    assert "Traceback" not in missing.stderr
    bad = _cli("info", str(tmp_path / "none.safetensors"))
    assert bad.returncode == 2 and "adapter file not found" in bad.stderr
    hub = _cli("generate", "--prompt", "x", "--out", str(tmp_path / "g"), "--base", "someone/not-here")
    assert hub.returncode == 2 and "hub" in hub.stderr and "Traceback" not in hub.stderr


DDP_PROBE = """
import os, sys, torch
import ether_diffusion.train.dreambooth as db
from ether_diffusion.inject import adapter_modules
from ether_diffusion.testing import tiny_sd_pipeline
from ether_diffusion.train import DreamBoothConfig, train_dreambooth

rank = int(os.environ["RANK"])
real_save = db.save_adapter
def recording_save(path, *args, **kw):
    open(os.path.join(sys.argv[3], f"wrote-by-rank{rank}.txt"), "a").write(str(path) + "\\n")
    return real_save(path, *args, **kw)
db.save_adapter = recording_save
real_indices = db.sample_indices
def recording_indices(n, first, count, seed):
    picked = real_indices(n, first, count, seed)
    open(os.path.join(sys.argv[3], f"samples-rank{rank}.txt"), "a").write(f"{first} {picked[0]}\\n")
    return picked
db.sample_indices = recording_indices
if os.environ.get("NAN_ON_RANK") == str(rank):  # one rank's loss turns NaN at the second step
    from ether_diffusion.train import objectives
    real_loss = objectives.NoisePrediction.loss
    calls = []
    def nan_loss(*args, **kw):
        calls.append(1)
        loss = real_loss(*args, **kw)
        return loss * float("nan") if len(calls) == 2 else loss
    objectives.NoisePrediction.loss = nan_loss
pipe = tiny_sd_pipeline()
cfg = DreamBoothConfig(instance_dir=sys.argv[1], instance_prompt="a sks circle", output_dir=sys.argv[2],
                       max_steps=3, checkpointing_steps=2)
train_dreambooth(cfg, pipe=pipe)
vec = torch.cat([p.detach().flatten() for a in adapter_modules(pipe.unet, "default").values()
                 for p in a.vectors.values()])
torch.save(vec, os.path.join(sys.argv[3], f"rank{rank}.pt"))
"""


def test_two_process_ddp_splits_the_data_learns_and_ends_identical(instance_dir, tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(DDP_PROBE)
    out, dump = tmp_path / "ddp-out", tmp_path / "dump"
    dump.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(probe),
           str(instance_dir), str(out), str(dump)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    r0, r1 = torch.load(dump / "rank0.pt"), torch.load(dump / "rank1.pt")
    assert torch.equal(r0, r1)  # one model: gradients were all-reduced
    moved, total = moved_layers(load_file(out / "ether_adapter.safetensors"), "unet")
    assert moved == total > 0  # and it learned
    seen = [dict(line.split() for line in (dump / f"samples-rank{r}.txt").read_text().splitlines()) for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 3  # one sample per rank and step
    assert not set(seen[0]) & set(seen[1])  # the ranks draw different global samples every step ...
    firsts = sorted(int(k) for k in [*seen[0], *seen[1]])
    assert firsts == list(range(6))  # ... which together are the 6 samples of 3 steps × 2 ranks
    pictures = {**seen[0], **seen[1]}
    assert {pictures[str(i)] for i in range(3)} == {"0", "1", "2"}  # the first pass covers every picture once
    written = (dump / "wrote-by-rank0.txt").read_text().split()
    assert len(written) == 3 and written[-1].endswith("ether_adapter.safetensors")  # checkpoints 2, 3 and final
    assert not (dump / "wrote-by-rank1.txt").exists()
    assert (out / "ether_adapter.safetensors").is_file() and (out / "checkpoint-2").is_dir()


def test_fp16_trains_through_the_loss_scaler_skips_overflowing_steps_and_resumes_exactly(instance_dir, tmp_path,
                                                                                          monkeypatch):
    """fp16: backward goes through a GradScaler (on this CPU the one the loop installs; accelerate's on a GPU).
    A deliberately huge initial scale overflows the fp16 backward: those steps must be skipped (no optimiser or
    schedule step), the scale must fall, training must go on, and the scaler state must resume exactly."""
    import functools

    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0**24))
    kw = dict(max_steps=8, checkpointing_steps=4, method="etherplus", mixed_precision="fp16")
    full = tmp_path / "full"
    train_dreambooth(config(instance_dir, full, **kw), pipe=tiny_sd_pipeline().to(torch.float16))
    state = torch.load(full / "checkpoint-8" / "optimizer.pt", weights_only=True)
    assert state["scaler"] is not None and state["scaler"]["scale"] < 2.0**24  # overflow was detected
    adam_steps = {int(s["step"]) for s in state["optimizer"]["state"].values()}
    assert adam_steps and max(adam_steps) < 8  # the overflowing steps were skipped, not applied
    assert state["lr_scheduler"]["last_epoch"] == max(adam_steps)
    final = load_file(full / "ether_adapter.safetensors")
    first = load_file(full / "checkpoint-4" / "adapter.safetensors")
    assert all(torch.isfinite(v).all() for v in final.values())
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    shutil.copytree(full / "checkpoint-4", interrupted / "checkpoint-4")
    train_dreambooth(config(instance_dir, interrupted, resume_from_checkpoint="latest", **kw),
                     pipe=tiny_sd_pipeline().to(torch.float16))
    resumed = load_file(interrupted / "ether_adapter.safetensors")
    assert any(not torch.equal(final[k], first[k]) for k in final)  # it trained after the skipped steps
    for key in final:
        torch.testing.assert_close(final[key], resumed[key], atol=1e-6, rtol=1e-5)
    resumed_state = torch.load(interrupted / "checkpoint-8" / "optimizer.pt", weights_only=True)
    assert resumed_state["scaler"]["scale"] == state["scaler"]["scale"]


@pytest.mark.parametrize("change", [{"n_blocks": 2}, {"method": "ether"}, {"sides": "input"}])
def test_resume_with_other_adapter_settings_is_refused_by_name(instance_dir, tmp_path, change):
    kw = dict(max_steps=2, checkpointing_steps=2, method="etherplus", n_blocks=1)
    train_dreambooth(config(instance_dir, tmp_path, **kw), pipe=tiny_sd_pipeline())
    kw.update(change, max_steps=4)
    with pytest.raises(EtherError, match=f"other adapter settings.*{next(iter(change))}"):
        train_dreambooth(config(instance_dir, tmp_path, resume_from_checkpoint="latest", **kw), pipe=tiny_sd_pipeline())


@pytest.mark.parametrize("text,problem", [
    ('learning_rate = "6e-3"\nmax_steps = 1e3', None),
    ("max_steps = 1.5", "max_steps"),
    ('max_steps = "many"', "max_steps"),
    ("checkpoints_total_limit = 0", "checkpoints_total_limit"),
    ("validation_prompts = 3", "validation_prompts"),
])
def test_config_files_are_typed_before_any_model_loads(instance_dir, tmp_path, text, problem, capsys, monkeypatch):
    from ether_diffusion.cli import main
    from ether_diffusion.train import loop

    (tmp_path / "c.toml").write_text(text + "\n")
    loads = []
    monkeypatch.setattr(loop, "load_pipeline", lambda *a, **k: loads.append(1) or (_ for _ in ()).throw(
        EtherError("stop here: the config was accepted")))
    code = main(["train", "dreambooth", "--config", str(tmp_path / "c.toml"), "--instance-dir", str(instance_dir),
                 "--instance-prompt", "a sks circle", "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    if problem is None:  # accepted, converted: training went on to load the model
        assert "stop here" in err[0]
    else:
        assert problem in err[0] and not loads, err


def test_a_nan_on_one_rank_stops_every_rank_instead_of_hanging(instance_dir, tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(DDP_PROBE)
    dump = tmp_path / "dump"
    dump.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NAN_ON_RANK": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(probe),
           str(instance_dir), str(tmp_path / "out"), str(dump)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)  # a hang fails here
    assert result.returncode != 0
    assert result.stderr.count("the loss became nan at step 2") >= 2, result.stderr[-3000:]  # both ranks stopped
