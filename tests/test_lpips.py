"""LPIPS against an independent fp64 computation of the paper's formula, from weight files in the published
layouts (torchvision's AlexNet checkpoint, the lpips package's linear heads), and the diversity score."""

import random

import pytest
import torch
import torch.nn.functional as F

from ether_diffusion.errors import EtherError
from ether_diffusion.lpips import ALEXNET_FILE, HEADS_FILE, Lpips, diversity, locate, to_tensor
from ether_diffusion.testing import random_lpips_weights as write_random_weights
from ether_diffusion.toyworld import world

CONVS = [(0, 11, 4, 2), (3, 5, 1, 2), (6, 3, 1, 1), (8, 3, 1, 1), (10, 3, 1, 1)]  # features index, kernel, stride, pad


def reference_lpips(trunk, heads, a, b):
    """Zhang et al. 2018 v0.1, written out in fp64: per-channel scaling, AlexNet relu1..relu5, channel-unit
    normalisation, squared difference weighted by the heads, spatial mean, sum over layers."""
    shift = torch.tensor([-0.030, -0.088, -0.188], dtype=torch.float64).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450], dtype=torch.float64).view(1, 3, 1, 1)

    def feats(x):
        x = (x.double() - shift) / scale
        out = []
        for n, (i, _, stride, pad) in enumerate(CONVS):
            if n in (1, 2):
                x = F.max_pool2d(x, 3, 2)
            x = F.relu(F.conv2d(x, trunk[f"features.{i}.weight"].double(), trunk[f"features.{i}.bias"].double(),
                                stride=stride, padding=pad))
            out.append(x)
        return out

    total = torch.zeros(a.shape[0], dtype=torch.float64)
    for n, (x, y) in enumerate(zip(feats(a), feats(b))):
        x = x / (x.norm(dim=1, keepdim=True) + 1e-10)
        y = y / (y.norm(dim=1, keepdim=True) + 1e-10)
        w = heads[f"lin{n}.model.1.weight"].double().view(1, -1, 1, 1)
        total += ((x - y) ** 2 * w).sum(1).mean((1, 2))
    return total


def pictures(n, seed):
    rng = random.Random(seed)
    return [world.render(world.random_scene(rng)) for _ in range(n)]


def test_distance_equals_the_formula_in_fp64(tmp_path):
    trunk, heads = write_random_weights(tmp_path)
    model = Lpips.from_files(*locate(tmp_path))
    ims = pictures(4, 1)
    a, b = torch.cat([to_tensor(im) for im in ims[:2]]), torch.cat([to_tensor(im) for im in ims[2:]])
    got = model(a, b)
    expected = reference_lpips(trunk, heads, a, b)
    assert torch.allclose(got.double(), expected, rtol=1e-4, atol=1e-6)
    assert (expected > 1e-3).all()
    assert torch.allclose(model(b, a), got, rtol=1e-5) and model(a, a).abs().max() < 1e-6


def test_diversity_pairs_pictures_of_the_same_prompt(tmp_path):
    trunk, heads = write_random_weights(tmp_path)
    model = Lpips.from_files(*locate(tmp_path))
    ims = pictures(5, 2)
    t = [to_tensor(im) for im in ims]
    d = lambda i, j: float(reference_lpips(trunk, heads, t[i], t[j])[0])  # noqa: E731
    prompts = ["p", "p", "p", "q", "q"]
    expected = ((d(0, 1) + d(0, 2) + d(1, 2)) / 3 + d(3, 4)) / 2
    assert diversity(model, ims, prompts) == pytest.approx(expected, rel=1e-4)
    assert diversity(model, [ims[0]] * 3, ["p"] * 3) == pytest.approx(0.0, abs=1e-6)
    assert diversity(model, ims[:2], ["p", "q"]) is None  # no prompt drawn twice


def test_missing_or_broken_files_are_clear_errors(tmp_path):
    with pytest.raises(EtherError, match=ALEXNET_FILE):
        locate(tmp_path)
    write_random_weights(tmp_path)
    torch.save({"lin0.model.1.weight": torch.ones(1, 64, 1, 1)}, tmp_path / HEADS_FILE)
    with pytest.raises(EtherError, match="could not load LPIPS weights"):
        Lpips.from_files(*locate(tmp_path))
