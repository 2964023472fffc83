"""The shipped base model: loads offline as a plain diffusers pipeline, draws 64×64 pictures, and the demo's
whole loop (render subject → DreamBooth with prior preservation → compare) runs and improves subject fidelity."""

import json

import pytest

from ether_diffusion.demo import DemoSettings, run_demo
from ether_diffusion.pipelines import generate, load_pipeline
from ether_diffusion.toyworld import checker
from ether_diffusion.toyworld.base_model import EMBEDDED_MODEL_DIR


def test_embedded_model_loads_offline_with_plain_diffusers():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(EMBEDDED_MODEL_DIR, local_files_only=True)
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 64
    total = sum(p.stat().st_size for p in EMBEDDED_MODEL_DIR.rglob("*") if p.is_file())
    assert total <= 40 * 2**20


def test_embedded_model_draws_what_it_is_asked():
    pipe = load_pipeline()
    images = generate(pipe, "a large red circle on a white background", seed=0, steps=20, num_images=2)
    assert images[0].size == (64, 64)
    readings = [checker.read(im) for im in images]
    assert all(r.background == "white" for r in readings)
    assert any(r.colour == "red" for r in readings)


def test_the_embedded_codec_carries_every_subject_at_every_size_and_background():
    """Encoded and decoded, each subject's renders still score as the subject on average in every context (the
    tuned decoder's point: before it, small checkered diamonds on gray came back at 0.60, none matching)."""
    from ether_diffusion.toyworld.evaluate import codec_fidelity

    result = codec_fidelity(load_pipeline().vae, n=16)
    for subject, contexts in result.items():
        for context, row in contexts.items():
            assert row["decoded"] >= checker.SUBJECT_MATCH, (subject, context, row)
            assert row["decoded_matches"] >= row["n"] // 2, (subject, context, row)


def test_demo_reduced_mode_writes_everything(tmp_path):
    settings = DemoSettings(out=str(tmp_path / "demo"), max_steps=20, class_images=2, seeds=1, sampling_steps=8)
    report = run_demo(settings)
    out = tmp_path / "demo"
    for name in ("ether_adapter.safetensors", "grid.png", "report.json", "report.md", "README.md", "instance"):
        assert (out / name).exists(), name
    assert json.loads((out / "report.json").read_text())["adapted"] == report["adapted"]
    prompts = len(report["prompts"])
    assert prompts >= 6
    for model in ("base", "adapted"):
        scores = report[model]
        assert 0.0 <= scores["subject_fidelity"] <= 1.0 and scores["images"] == prompts
        assert {"subject_match_rate", "prompt_fidelity", "class_drift"} <= scores.keys()
    captions = sorted((out / "instance").glob("*.txt"))
    assert captions and all("sks ringed triangle" in c.read_text() for c in captions)


def test_short_dreambooth_run_raises_subject_fidelity_over_the_base(tmp_path):
    settings = DemoSettings(out=str(tmp_path / "short"), max_steps=300, class_images=4, seeds=2, sampling_steps=12)
    report = run_demo(settings)
    assert report["adapted"]["subject_fidelity"] > report["base"]["subject_fidelity"] + 0.01, report


@pytest.mark.slow
def test_full_demo_learns_the_subject_in_new_contexts(tmp_path):
    """The demo's targets, adapted match ≥ 0.8 and prompt fidelity ≥ 0.9, are met on average over seeds 0–3 (0.92 /
    0.91; docs/demo-report.md); one seed's run must match ≥ 0.8 with prompt fidelity ≥ 0.85 (seed 0: 0.93 / 0.86),
    base match ≤ 0.1, class drift ≤ 0.2."""
    report = run_demo(DemoSettings(out=str(tmp_path / "full")))
    assert report["base"]["subject_match_rate"] <= 0.1
    assert report["adapted"]["subject_match_rate"] >= 0.8 and report["adapted"]["prompt_fidelity"] >= 0.85, report
    assert report["adapted"]["class_drift"] <= 0.2


def test_demo_command_passes_subject_and_seed_through(tmp_path, monkeypatch, capsys):
    """`ether-diffusion demo --subject S --seed N` reaches the demo's settings (the figures differ by seed)."""
    from ether_diffusion import demo
    from ether_diffusion.cli import main

    seen = []
    scores = {"subject_match_rate": 0.0, "prompt_fidelity": 0.0, "class_drift": 0.0}
    monkeypatch.setattr(demo, "run_demo", lambda s: seen.append(s) or {"base": scores, "adapted": scores,
                                                                     "seconds": {"total": 0.0}})
    assert main(["demo", "--out", str(tmp_path), "--subject", "core-triangle", "--seed", "2"]) in (0, None)
    assert (seen[0].subject, seen[0].seed, seen[0].out) == ("core-triangle", 2, str(tmp_path))
    assert "subject match rate" in capsys.readouterr().out
    assert main(["demo", "--out", str(tmp_path), "--subject", "random", "--seed", "7"]) in (0, None)
    assert (seen[1].subject, seen[1].seed) == ("random-7", 7)  # a subject drawn from the seed
    assert main(["demo", "--out", str(tmp_path), "--subject", "random-12"]) in (0, None)
    assert seen[2].subject == "random-12"
    assert main(["demo"]) in (0, None)
    assert seen[3] == DemoSettings()  # no flags: exactly the documented defaults
    assert main(["demo", "--method", "ether", "--no-train-text-encoder", "--class-images", "3"]) in (0, None)
    assert (seen[4].method, seen[4].train_text_encoder, seen[4].class_images) == ("ether", False, 3)
    assert main(["demo", "--max-steps", "1400", "--learning-rate", "6e-3", "--prior-loss-weight", "1"]) in (0, None)
    assert (seen[5].max_steps, seen[5].learning_rate, seen[5].prior_loss_weight) == (1400, 6e-3, 1.0)  # the paper's


def test_demo_trains_with_its_documented_prior_weight(tmp_path):
    """What a user gets without flags: 600 steps at 2e-2 with a tenth of the paper's prior-preservation weight."""
    from ether_diffusion.demo import dreambooth_config

    cfg = dreambooth_config(DemoSettings(), tmp_path / "instance", tmp_path, tmp_path / "class")
    assert (cfg.max_steps, cfg.learning_rate, cfg.prior_loss_weight) == (600, 2e-2, 0.1)
    assert cfg.with_prior_preservation and cfg.train_text_encoder
    paper = dreambooth_config(DemoSettings(max_steps=1400, learning_rate=6e-3, prior_loss_weight=1.0),
                              tmp_path / "instance", tmp_path, tmp_path / "class")
    assert paper.prior_loss_weight == 1.0


def test_demo_reports_where_misses_lie_on_a_random_subject(tmp_path):
    settings = DemoSettings(out=str(tmp_path / "r"), subject="random-3", max_steps=4, class_images=2, seeds=1,
                            sampling_steps=4)
    report = run_demo(settings)
    for model in ("base", "adapted"):
        scores = report[model]
        assert {"identity_rate", "context_rate"} <= scores.keys()
        # prompt fidelity needs the family and the context right, so it cannot exceed the context share
        assert scores["prompt_fidelity"] <= scores["context_rate"] + 1e-9
    assert report["subject"] == "random-3" and "leading" in report["subject_description"]
    assert all("sks" in c.read_text() for c in (tmp_path / "r" / "instance").glob("*.txt"))
