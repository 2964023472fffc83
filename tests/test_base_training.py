"""The embedded model's trainer end to end, shortened (slow: run with `python -m pytest -m slow`)."""

import json

import pytest

from ether_diffusion.pipelines import generate, load_pipeline
from ether_diffusion.toyworld.train_base import main as train_base


@pytest.mark.slow
def test_train_base_writes_a_loadable_pipeline_and_reuses_the_finished_vae(tmp_path):
    out = tmp_path / "base"
    args = ["--out", str(out), "--vae-steps", "20", "--unet-steps", "10", "--pool", "256", "--batch-size", "8"]
    train_base(args)
    pipe = load_pipeline(str(out / "pipeline"))
    assert generate(pipe, "a red circle on a white background", steps=2)[0].size == (64, 64)
    last = json.loads((out / "training-log.jsonl").read_text().splitlines()[-1])
    assert last["stage"] == "done" and last["steps"] == 10
    vae_stamp = (out / "vae.pt").stat().st_mtime_ns
    train_base(args)  # a second start reuses the finished VAE instead of training it again
    assert (out / "vae.pt").stat().st_mtime_ns == vae_stamp
