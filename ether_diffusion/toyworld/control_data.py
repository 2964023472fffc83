"""Toy-world control datasets: rendered scene + its segmentation or edge map + caption, in the folder layout
`ether-diffusion train control` reads (diffusers' ControlNet convention):

    python -m ether_diffusion.toyworld.control_data --out data/seg --kind segmentation --n 2000

writes `images/NNNNN.png`, `conditioning/NNNNN.png` and `metadata.jsonl` rows
{"image": "images/00000.png", "conditioning_image": "conditioning/00000.png", "text": "a large red circle …"}.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from tqdm.auto import tqdm

from ..atomic import atomic_write, atomic_write_text
from . import world

RENDERERS = {"segmentation": world.render_segmentation, "edges": world.render_edges}


def control_scenes(n: int, seed: int) -> list[world.Scene]:
    """Seeded base-world scenes (the object's place varies; the caption cannot say where it is)."""
    rng = random.Random(seed)
    return [world.random_scene(rng) for _ in range(n)]


def write_control_dataset(out: str | Path, kind: str, n: int, seed: int = 0) -> Path:
    """Render n scenes with their `kind` maps into `out`; return the metadata.jsonl path."""
    out = Path(out)
    render_map = RENDERERS[kind]
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "conditioning").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, scene in enumerate(tqdm(control_scenes(n, seed), desc=f"render {kind} pairs")):
        image, hint = f"images/{i:05d}.png", f"conditioning/{i:05d}.png"
        atomic_write(out / image, lambda tmp, s=scene: world.render(s).save(tmp, format="PNG"))
        atomic_write(out / hint, lambda tmp, s=scene: render_map(s).save(tmp, format="PNG"))
        rows.append(json.dumps({"image": image, "conditioning_image": hint, "text": world.caption(scene)}))
    return atomic_write_text(out / "metadata.jsonl", "\n".join(rows) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--kind", choices=sorted(RENDERERS), default="segmentation")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(f"wrote {write_control_dataset(args.out, args.kind, args.n, args.seed)}")


if __name__ == "__main__":
    main()
