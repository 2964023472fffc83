"""LPIPS (Zhang et al. 2018, v0.1, AlexNet trunk) without torchvision, for the diversity score of `eval`.

The reference `lpips` package imports torchvision, which cannot sit beside every torch build; the network is
small enough to define here with torchvision's parameter names, so the published files load unchanged:

- torchvision's ImageNet AlexNet checkpoint (`alexnet-owt-7be5be79.pth`; only `features.*` is used), and
- the `lpips` package's calibrated linear heads (`lpips/weights/v0.1/alex.pth`, keys `linK.model.1.weight`).

Distance between two pictures: scale to [-1, 1], shift/scale per channel, take the five ReLU outputs of
AlexNet's feature stack, unit-normalise each feature vector over channels, square the difference, weight the
channels with the linear head, average over space and sum over the five layers.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from .data import image_to_tensor
from .errors import EtherError

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
HEADS_FILE = "alex.pth"
CHANNELS = (64, 192, 384, 256, 256)
LAYER_ENDS = (2, 5, 8, 10, 12)  # after relu1 … relu5 in torchvision's `alexnet().features`
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


def alexnet_features() -> nn.Sequential:
    """AlexNet's convolutional stack up to relu5, indexed as torchvision's `alexnet().features`."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(),
    )


class Lpips(nn.Module):
    """LPIPS v0.1 with an AlexNet trunk; `forward(a, b)` takes [-1, 1] batches and returns one distance each."""

    def __init__(self) -> None:
        super().__init__()
        self.features = alexnet_features()
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in CHANNELS)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1))
        self.requires_grad_(False).eval()

    @classmethod
    def from_files(cls, trunk: Path, heads: Path) -> "Lpips":
        """Load torchvision's AlexNet checkpoint (`features.*`) and lpips' linear heads."""
        model = cls()
        try:
            trunk_state = torch.load(trunk, map_location="cpu", weights_only=True)
            heads_state = torch.load(heads, map_location="cpu", weights_only=True)
            model.features.load_state_dict({k[len("features."):]: v for k, v in trunk_state.items()
                                            if k.startswith("features.")})
            model.heads.load_state_dict({f"{i}.weight": heads_state[f"lin{i}.model.1.weight"]
                                         for i in range(len(CHANNELS))})
        except (RuntimeError, KeyError, OSError, AttributeError) as exc:
            raise EtherError(f"could not load LPIPS weights from {trunk} and {heads}: "
                             f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        return model

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        total = 0
        for head, x, y in zip(self.heads, self._unit_features(a), self._unit_features(b)):
            total = total + head((x - y).square()).mean((1, 2, 3))
        return total

    def _unit_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The five ReLU outputs of the scaled input, each feature vector unit length over channels."""
        x, outs, start = (x - self.shift) / self.scale, [], 0
        for end in LAYER_ENDS:
            x = self.features[start:end](x)
            outs.append(x / (x.square().sum(1, keepdim=True).sqrt() + 1e-10))
            start = end
        return outs


def locate(folder: str | Path | None = None) -> tuple[Path, Path]:
    """The trunk and head files: both in `folder`, or where torch hub and the `lpips` package keep them."""
    if folder is not None:
        trunk, heads = Path(folder) / ALEXNET_FILE, Path(folder) / HEADS_FILE
    else:
        import importlib.util

        spec = importlib.util.find_spec("lpips")  # finds the package's files without importing it (torchvision)
        package = Path(spec.origin).parent if spec and spec.origin else Path("<lpips not installed>")
        trunk = Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILE
        heads = package / "weights" / "v0.1" / HEADS_FILE
    missing = [str(p) for p in (trunk, heads) if not p.is_file()]
    if missing:
        raise EtherError(f"LPIPS weights not found: {', '.join(missing)} (put torchvision's {ALEXNET_FILE} and "
                         f"the lpips package's weights/v0.1/{HEADS_FILE} in one folder and pass it)")
    return trunk, heads


def to_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL picture as a 1×3×H×W tensor in [-1, 1]."""
    return image_to_tensor(image)[None]


@torch.no_grad()
def diversity(model: Lpips, images: list[Image.Image], prompts: list[str]) -> float | None:
    """Mean LPIPS over all pairs of pictures drawn from the same prompt, averaged over prompts (higher = more
    varied); None when no prompt has two pictures."""
    groups: dict[str, list[torch.Tensor]] = defaultdict(list)
    for image, prompt in zip(images, prompts):
        groups[prompt].append(to_tensor(image))
    per_prompt = []
    for tensors in groups.values():
        pairs = list(itertools.combinations(range(len(tensors)), 2))
        if pairs:
            a = torch.cat([tensors[i] for i, _ in pairs])
            b = torch.cat([tensors[j] for _, j in pairs])
            per_prompt.append(float(model(a, b).mean()))
    return sum(per_prompt) / len(per_prompt) if per_prompt else None
