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


def test_an_init_from_folder_that_is_no_pipeline_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        train_base(["--out", str(tmp_path / "base"), "--init-from", str(tmp_path / "empty")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--init-from:" in err and "no model_index.json" in err
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


def test_grow_unet_adds_transformer_layers_as_identities():
    import torch
    from diffusers import UNet2DConditionModel

    from ether_diffusion.toyworld.train_base import grow_unet

    def unet(layers):
        return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                    block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D",) * 2,
                                    up_block_types=("CrossAttnUpBlock2D",) * 2, cross_attention_dim=32,
                                    attention_head_dim=8, norm_num_groups=16, transformer_layers_per_block=layers)

    torch.manual_seed(0)
    small, deep = unet(1), unet(2)
    new = grow_unet(deep, small.state_dict())
    assert len(new) == 7 and all(name.endswith(".transformer_blocks.1") for name in new)  # 2 down, 4 up, 1 mid
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10, 700]), torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(deep(x, t, ctx).sample, small(x, t, ctx).sample)
    deep(x, t, ctx).sample.square().mean().backward()
    layer = deep.get_submodule(new[0])
    assert all(m.weight.grad.abs().sum() > 0 for m in (layer.attn1.to_out[0], layer.attn2.to_out[0], layer.ff.net[2]))


def test_min_snr_loss_weights_each_sample_by_its_clamped_snr():
    """The base trainer's --min-snr-gamma loss (the shared training pieces) on an epsilon-prediction schedule."""
    from types import SimpleNamespace

    import torch
    import torch.nn.functional as F

    from ether_diffusion.train.common import diffusion_loss, min_snr_weights

    torch.manual_seed(0)
    pred, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    scheduler = SimpleNamespace(alphas_cumprod=torch.tensor([0.999, 0.9, 0.5, 0.01]),  # SNR 999, 9, 1, ~0.0101
                                config=SimpleNamespace(prediction_type="epsilon"))
    t = torch.tensor([0, 1, 3])
    torch.testing.assert_close(diffusion_loss(pred, noise).mean(), F.mse_loss(pred, noise))
    per_sample = [F.mse_loss(pred[i], noise[i]).item() for i in range(3)]
    expected = (per_sample[0] * 5 / 999 + per_sample[1] * 5 / 9 + per_sample[2] * 1.0) / 3
    assert abs(diffusion_loss(pred, noise, min_snr_weights(scheduler, t, 5.0)).mean().item() - expected) < 1e-5


def test_reconstruction_loss_weights_object_pixels():
    import torch

    from ether_diffusion.toyworld.train_base import reconstruction_loss

    target = torch.full((1, 3, 8, 8), 1.0)  # a white background ...
    target[:, :, 2:4, 2:4] = -1.0  # ... with a 2×2 black object
    recon = target.clone()
    recon[:, :, 2:4, 2:4] += 0.5  # wrong on the object only
    plain = reconstruction_loss(recon, target)
    torch.testing.assert_close(plain, torch.tensor(4 / 64 * (0.25 + 0.5 * 0.5)))
    torch.testing.assert_close(reconstruction_loss(recon, target, object_weight=4.0), 5 * plain)
    background_error = target.clone()
    background_error[:, :, 6:, 6:] -= 0.5  # the same error on the background is not weighted
    torch.testing.assert_close(reconstruction_loss(background_error, target, object_weight=4.0), plain)


def test_codec_fidelity_of_a_lossless_codec_is_the_rendered_score():
    """With an identity codec, the decoded pictures are the renders: same scores, every subject matching."""
    from types import SimpleNamespace

    import torch

    from ether_diffusion.toyworld import world
    from ether_diffusion.toyworld.evaluate import codec_fidelity

    class Lossless:
        device, dtype = torch.device("cpu"), torch.float32

        def encode(self, x):
            return SimpleNamespace(latent_dist=SimpleNamespace(mean=x))

        def decode(self, z):
            return SimpleNamespace(sample=z)

    result = codec_fidelity(Lossless(), n=2)
    assert set(result) == set(world.SUBJECTS)
    for contexts in result.values():
        assert len(contexts) == len(world.SIZES) * len(world.BACKGROUNDS)
        for row in contexts.values():
            assert abs(row["decoded"] - row["rendered"]) < 1e-3 and row["decoded_matches"] == 2


def test_tune_decoder_changes_only_the_decoder_and_resumes_exactly(tmp_path):
    import torch
    from diffusers import StableDiffusionPipeline

    from ether_diffusion.toyworld.base_model import EMBEDDED_MODEL_DIR
    from ether_diffusion.toyworld.tune_decoder import main as tune_decoder

    out = tmp_path / "dec"
    args = ["--base", str(EMBEDDED_MODEL_DIR), "--out", str(out), "--steps", "3", "--pool", "8", "--batch-size", "2",
            "--checkpointing-steps", "2", "--eval-images", "1", "--lr", "1e-3"]
    tune_decoder(args)
    base = StableDiffusionPipeline.from_pretrained(EMBEDDED_MODEL_DIR, local_files_only=True)
    first = StableDiffusionPipeline.from_pretrained(out / "pipeline", local_files_only=True)
    for name in ("unet", "text_encoder"):
        for (key, a), b in zip(getattr(base, name).state_dict().items(), getattr(first, name).state_dict().values()):
            assert torch.equal(a, b), f"{name}.{key} changed"
    vae_base, vae_first = base.vae.state_dict(), first.vae.state_dict()
    frozen = [k for k in vae_base if k.startswith(("encoder.", "quant_conv."))]
    assert frozen and all(torch.equal(vae_base[k], vae_first[k]) for k in frozen)
    assert any(not torch.equal(vae_base[k], vae_first[k]) for k in vae_base if k.startswith("decoder."))
    record = json.loads((out / "pipeline" / "TRAINING.json").read_text())["decoder_tuning"]
    assert set(record["codec_fidelity_after"]) == set(record["codec_fidelity_before"])
    # started again, the run continues from its step-2 checkpoint and ends where the first one did
    tune_decoder(args)
    again = StableDiffusionPipeline.from_pretrained(out / "pipeline", local_files_only=True).vae.state_dict()
    assert all(torch.equal(vae_first[k], again[k]) for k in vae_first)
