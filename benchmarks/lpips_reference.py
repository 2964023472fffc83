"""Check `ether_diffusion.lpips` against the reference `lpips` package on the same weights.

    pip install --no-deps lpips==0.1.4 && python benchmarks/lpips_reference.py

The package imports torchvision (only for `torchvision.models.alexnet`) and scipy (only in its trainer); both are
replaced by stand-ins here, so the comparison runs beside any torch build: the package's own calibrated heads
(`weights/v0.1/alex.pth`) with a random AlexNet trunk shared by both sides, on toy-world pictures. Prints the
distances and the largest difference; exits 1 if it exceeds 1e-5.
"""

from __future__ import annotations

import importlib.util
import random
import sys
import tempfile
import types
from pathlib import Path

import torch

from ether_diffusion.lpips import HEADS_FILE, Lpips, locate, to_tensor
from ether_diffusion.testing import random_lpips_weights
from ether_diffusion.toyworld import world


def package_dir() -> Path:
    """Where the installed `lpips` package lives, found without importing it."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or spec.origin is None:
        raise SystemExit("the lpips package is not installed: pip install --no-deps lpips==0.1.4")
    return Path(spec.origin).parent


def reference_lpips(trunk_features: torch.nn.Module):
    """The package's LPIPS with torchvision's AlexNet replaced by `trunk_features` and its scipy-only trainer
    stubbed."""
    tv, models = types.ModuleType("torchvision"), types.ModuleType("torchvision.models")
    models.alexnet = lambda *args, **kwargs: types.SimpleNamespace(features=trunk_features)
    tv.models = models
    sys.modules.update({"torchvision": tv, "torchvision.models": models,
                        "lpips.trainer": types.ModuleType("lpips.trainer")})
    import lpips

    return lpips.LPIPS(net="alex", version="0.1", verbose=False)


def main() -> None:
    heads = package_dir() / "weights" / "v0.1" / HEADS_FILE
    with tempfile.TemporaryDirectory() as tmp:
        random_lpips_weights(tmp)
        (Path(tmp) / HEADS_FILE).write_bytes(heads.read_bytes())  # the calibrated heads, a random trunk
        ours = Lpips.from_files(*locate(tmp))
    reference = reference_lpips(ours.features)  # one trunk module for both sides
    rng = random.Random(3)
    pictures = [to_tensor(world.render(world.random_scene(rng))) for _ in range(16)]
    a, b = torch.cat(pictures[:8]), torch.cat(pictures[8:])
    with torch.no_grad():
        expected, got = reference(a, b).flatten(), ours(a, b)
    diff = float((expected - got).abs().max())
    print("lpips package:", [round(float(x), 6) for x in expected])
    print("this project: ", [round(float(x), 6) for x in got])
    print(f"largest difference {diff:.2e}")
    sys.exit(0 if diff <= 1e-5 else 1)


if __name__ == "__main__":
    main()
