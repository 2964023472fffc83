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


@pytest.mark.parametrize("item", ["chess=2", "checker=0", "checker=x", "checker"])
def test_a_bad_pattern_weight_is_a_usage_error(tmp_path, item):
    with pytest.raises(SystemExit) as exit_info:
        train_base(["--out", str(tmp_path / "base"), "--pattern-weight", item])
    assert exit_info.value.code == 2
    assert not (tmp_path / "base").exists()


def _tiny_unet(down, up):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=down, up_block_types=up,
                                cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16)


def test_grow_unet_adds_attention_as_an_identity_and_refuses_other_changes():
    import torch

    from ether_diffusion.toyworld.train_base import grow_unet

    torch.manual_seed(0)
    small = _tiny_unet(("DownBlock2D", "CrossAttnDownBlock2D"), ("CrossAttnUpBlock2D", "UpBlock2D"))
    grown = _tiny_unet(("CrossAttnDownBlock2D",) * 2, ("CrossAttnUpBlock2D",) * 2)
    new = grow_unet(grown, small.state_dict())
    assert new == ["down_blocks.0.attentions.0", "up_blocks.1.attentions.0", "up_blocks.1.attentions.1"]
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10, 700]), torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(grown(x, t, ctx).sample, small(x, t, ctx).sample)
    # the grown blocks train: their output projections get gradients
    grown(x, t, ctx).sample.square().mean().backward()
    assert grown.get_submodule("down_blocks.0.attentions.0").proj_out.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="cannot grow"):
        grow_unet(small, grown.state_dict())  # tensors the target has no place for
