"""`ether-diffusion demo --task control` on the shipped base: a reduced run writes everything consistently, the
command passes its flags through, and (slow) the full demo follows the maps."""

import json

import pytest
from PIL import Image

from ether_diffusion.adapter_file import read_adapter_file
from ether_diffusion.cli import main
from ether_diffusion.control_demo import ControlDemoSettings, run_control_demo


def test_reduced_control_demo_writes_grid_report_and_adapter(tmp_path):
    settings = ControlDemoSettings(out=str(tmp_path / "demo"), pairs=16, max_steps=4, maps=2, seeds=2,
                                   sampling_steps=4)
    report = run_control_demo(settings)
    out = tmp_path / "demo"
    assert json.loads((out / "report.json").read_text()) == report
    assert "| adapted |" in (out / "report.md").read_text()
    for model in ("base", "adapted"):
        scores = report[model]
        assert len(scores["per_scene_iou"]) == 2 * 2  # maps × seeds
        assert 0 <= scores["mean_iou"] <= 1 and set(scores["accuracy"]) == {"background", "colour", "shape"}
    grid = Image.open(out / "grid.png")
    assert grid.size == (2 * 64 * (1 + 2 * 2), 2 * 64 * 2)  # map | base seeds | adapted seeds, one row per map
    adapter = read_adapter_file(out / "ether_control.safetensors")
    assert adapter.control["kind"] == "segmentation" and adapter.control["encoder"]["injection"] == "multiscale"
    assert adapter.metadata["training"]["steps"] == 4


def test_demo_task_control_passes_its_flags_and_keeps_its_own_defaults(tmp_path, monkeypatch, capsys):
    from ether_diffusion import demo

    seen = []
    scores = {"mean_iou": 0.5, "iou_over_0.5": 0.5, "accuracy": {"colour": 1.0}}
    monkeypatch.setattr(demo, "run_control_demo", lambda s: seen.append(s) or {
        "base": scores, "adapted": scores, "seconds": {"total": 1.0}})
    assert main(["demo", "--task", "control", "--out", str(tmp_path), "--kind", "edges", "--seed", "3"]) in (0, None)
    assert main(["demo", "--task", "control", "--control-injection", "conv_in", "--max-steps", "9"]) in (0, None)
    first, second = seen
    defaults = ControlDemoSettings()
    assert (first.out, first.kind, first.seed, first.max_steps, first.learning_rate) == (
        str(tmp_path), "edges", 3, defaults.max_steps, defaults.learning_rate)
    assert (second.injection, second.max_steps, second.out) == ("conv_in", 9, defaults.out)
    assert "mean IoU with the map" in capsys.readouterr().out


@pytest.mark.slow
def test_full_control_demo_follows_the_segmentation_maps(tmp_path):
    """The control demo's target: mean IoU ≥ 0.8 with the caption's background, colour and shape right."""
    report = run_control_demo(ControlDemoSettings(out=str(tmp_path / "full")))
    adapted, base = report["adapted"], report["base"]
    assert adapted["mean_iou"] >= 0.8 and base["mean_iou"] < 0.4, (base["mean_iou"], adapted["mean_iou"])
    assert min(adapted["accuracy"].values()) >= 0.9, adapted["accuracy"]


@pytest.mark.parametrize("task, flags", [
    ("control", ["--subject", "striped-circle"]), ("control", ["--class-images", "4", "--no-train-text-encoder"]),
    ("control", ["--prior-loss-weight", "1"]),
    ("subject", ["--kind", "edges"]), ("subject", ["--pairs", "10", "--control-injection", "conv_in"])])
def test_demo_refuses_the_other_tasks_flags(task, flags, monkeypatch, capsys):
    """A flag only the other task reads is refused with exit status 2 before any work, never silently ignored."""
    from ether_diffusion import demo

    def never(settings):
        raise AssertionError("a demo ran despite a flag it would ignore")

    monkeypatch.setattr(demo, "run_control_demo", never)
    monkeypatch.setattr(demo, "run_demo", never)
    assert main(["demo", "--task", task, *flags]) == 2
    err = capsys.readouterr().err
    assert flags[0] in err and f"--task {'subject' if task == 'control' else 'control'}" in err
