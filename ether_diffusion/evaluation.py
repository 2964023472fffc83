"""Subject-driven generation metrics, the DreamBooth protocol: DINO, CLIP-I, CLIP-T and LPIPS diversity.

- DINO: cosine similarity between the CLS embeddings (a DINO ViT, default ViT-S/16) of each generated picture
  and each reference photo of the subject, averaged over all pairs (subject fidelity, sensitive to detail).
- CLIP-I: the same with CLIP image embeddings.
- CLIP-T: cosine similarity between each generated picture and its prompt in CLIP space, the identifier token
  removed (prompt fidelity).
- LPIPS diversity: mean LPIPS between pictures of the same prompt (`ether_diffusion.lpips`); low values mean
  the adapter draws one picture whatever the seed (overfitting).

The protocol: the 25 DreamBooth prompt templates (objects or live subjects, `ether_diffusion/resources/dreambooth_prompts.json`),
4 pictures per prompt, each with a recorded seed. Backbones come from local folders or hub ids the user passes;
nothing is downloaded unless asked, and an unavailable backbone is one clear error. On the toy world the
checker (`ether_diffusion.toyworld.evaluate`) gives the equivalent scores without any backbone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from .atomic import atomic_write, atomic_write_text
from .errors import EtherError
from .lpips import diversity

PROMPTS_RESOURCE = "resources/dreambooth_prompts.json"  # shipped inside the package (importlib.resources)
DEFAULT_DINO = "facebook/dino-vits16"
CLIP_BACKBONES = {"ViT-L/14": "openai/clip-vit-large-patch14", "B/32": "openai/clip-vit-base-patch32"}


def protocol_prompts(token: str, class_word: str, live: bool = False, path: str | Path | None = None) -> list[str]:
    """The 25 DreamBooth prompts for a subject ('sks', 'dog'), object or live-subject list."""
    source = Path(path) if path else resources.files("ether_diffusion").joinpath(PROMPTS_RESOURCE)
    if not source.is_file():
        raise EtherError(f"prompt list not found: {source} (pass --prompts FILE with {{'object': […], 'live': […]}})")
    templates = json.loads(source.read_text())["live" if live else "object"]
    return [t.format(token=token, cls=class_word) for t in templates]


@dataclass
class Sample:
    """One generated picture with the prompt and seed that made it."""

    image: Image.Image
    prompt: str
    seed: int | None = None


def generate_protocol(pipe, prompts: list[str], out_dir: str | Path, images_per_prompt: int = 4, seed: int = 0,
                      steps: int = 25, guidance: float = 7.5) -> list[Sample]:
    """Draw every prompt `images_per_prompt` times (seed = seed + running index); save PNGs, a `.txt` with each
    picture's prompt, and `manifest.json` (file, prompt, seed)."""
    from .pipelines import generate

    out_dir = Path(out_dir)
    samples, manifest = [], []
    for p, prompt in enumerate(tqdm(prompts, desc="protocol images")):
        for k in range(images_per_prompt):
            s = seed + p * images_per_prompt + k
            image = generate(pipe, prompt, seed=s, steps=steps, guidance=guidance)[0]
            name = f"{p:02d}-{k}.png"
            atomic_write(out_dir / name, lambda tmp, im=image: im.save(tmp, format="PNG"))
            atomic_write_text(out_dir / f"{p:02d}-{k}.txt", prompt)
            samples.append(Sample(image, prompt, s))
            manifest.append({"file": name, "prompt": prompt, "seed": s})
    atomic_write_text(out_dir / "manifest.json", json.dumps(manifest, indent=2))
    return samples


def _load(source: str, what: str, loader):
    local = Path(source).exists()
    try:
        return loader(source, local_files_only=local)
    except Exception as exc:  # noqa: BLE001 - hub and file errors come in many types; all mean "not available"
        raise EtherError(f"could not load the {what} backbone {source!r} (offline? pass a local folder): "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


class Backbones:
    """DINO and CLIP models with their processors, in eval mode, returning unit-length embeddings."""

    def __init__(self, dino: str = DEFAULT_DINO, clip: str = "ViT-L/14", device: str = "cpu"):
        from transformers import AutoImageProcessor, AutoModel, CLIPModel, CLIPProcessor

        clip = CLIP_BACKBONES.get(clip, clip)
        self.device = device
        self.dino = _load(dino, "DINO", AutoModel.from_pretrained).to(device).eval()
        self.dino_processor = _load(dino, "DINO", AutoImageProcessor.from_pretrained)
        self.clip = _load(clip, "CLIP", CLIPModel.from_pretrained).to(device).eval()
        self.clip_processor = _load(clip, "CLIP", CLIPProcessor.from_pretrained)
        self.names = {"dino": dino, "clip": clip}

    @staticmethod
    def _unit(x) -> torch.Tensor:
        x = x.pooler_output if hasattr(x, "pooler_output") else x
        return torch.nn.functional.normalize(x.float(), dim=-1)

    @torch.no_grad()
    def dino_embed(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = self.dino_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        return self._unit(self.dino(pixel_values=pixels.to(self.device)).last_hidden_state[:, 0])

    @torch.no_grad()
    def clip_image_embed(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = self.clip_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        return self._unit(self.clip.get_image_features(pixel_values=pixels.to(self.device)))

    @torch.no_grad()
    def clip_text_embed(self, texts: list[str]) -> torch.Tensor:
        tokens = self.clip_processor(text=texts, return_tensors="pt", padding=True, truncation=True)
        return self._unit(self.clip.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                      attention_mask=tokens["attention_mask"].to(self.device)))


def score(samples: list[Sample], references: list[Image.Image], backbones: Backbones,
          token: str | None = None, lpips=None) -> dict:
    """DINO, CLIP-I (mean over generated × reference pairs), CLIP-T (mean over generated pictures) and, given an
    `ether_diffusion.lpips.Lpips`, LPIPS diversity (None without one)."""
    if not samples or not references:
        raise EtherError("scoring needs at least one generated picture and one reference picture")
    images = [s.image for s in samples]
    dino = backbones.dino_embed(images) @ backbones.dino_embed(references).T
    clip_gen = backbones.clip_image_embed(images)
    clip_i = clip_gen @ backbones.clip_image_embed(references).T
    texts = [" ".join(w for w in s.prompt.split() if w != token) for s in samples]
    clip_t = (clip_gen * backbones.clip_text_embed(texts)).sum(-1)
    return {"dino": float(dino.mean()), "clip_i": float(clip_i.mean()), "clip_t": float(clip_t.mean()),
            "lpips_diversity": diversity(lpips, images, [s.prompt for s in samples]) if lpips else None,
            "generated": len(samples), "references": len(references), "backbones": backbones.names}


def markdown_table(report: dict) -> str:
    div = report.get("lpips_diversity")
    return ("| DINO | CLIP-I | CLIP-T | LPIPS diversity | pictures | references |\n|---|---|---|---|---|---|\n"
            f"| {report['dino']:.3f} | {report['clip_i']:.3f} | {report['clip_t']:.3f} | "
            f"{'n/a' if div is None else f'{div:.3f}'} | {report['generated']} | "
            f"{report['references']} |\n\nBackbones: DINO `{report['backbones']['dino']}`, CLIP "
            f"`{report['backbones']['clip']}`.\n")
