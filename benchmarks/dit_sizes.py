"""Trainable parameters and file sizes of ETHER / ETHER+ against LoRA r=16 on full-size FLUX.1-dev and SD3.5-medium
transformers, built on the meta device (every layer's shape, no memory, no download).

    python benchmarks/dit_sizes.py --out docs/benchmarks/dit-sizes.json

File sizes: an ETHER adapter file stores its vectors in fp32 (parameters × 4 bytes); a LoRA file in fp16
(parameters × 2 bytes); an ETHER adapter exported as an exact LoRA (`export --to lora`) has rank ≤ n per ETHER
side and ≤ 2n per ETHER+ side on every layer (both sides for ETHER+: ≤ 4 at n = 1), so at most that rank × (in +
out) × 2 bytes per layer.
"""

from __future__ import annotations

import argparse
import json

from ether_diffusion import AdapterConfig, add_adapter
from ether_diffusion.atomic import atomic_write_text
from ether_diffusion.inject import find_targets
from ether_diffusion.testing import full_size_transformer

EXPORT_RANK = {"ether": 1, "etherplus": 4}  # n = 1, default sides: the bound on the exact LoRA's rank per layer


def sizes(kind: str, targets: str) -> list[dict]:
    model = full_size_transformer(kind)
    names = find_targets(model, targets)
    in_out = sum(model.get_submodule(n).in_features + model.get_submodule(n).out_features for n in names)
    rows = [{"method": "lora-r16", "parameters": 16 * in_out, "file_mb": 16 * in_out * 2 / 2**20}]
    for method in ("ether", "etherplus"):
        model = full_size_transformer(kind)
        add_adapter(model, "a", AdapterConfig(method=method, n_blocks=1, targets=targets))
        params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        rows.append({"method": f"{method}-n1", "parameters": params, "file_mb": params * 4 / 2**20,
                     "exact_lora_export_mb_at_most": EXPORT_RANK[method] * in_out * 2 / 2**20})
    for row in rows:
        row.update(base=kind, targets=targets, layers=len(names), parameters_vs_lora_r16=row["parameters"] / rows[0]["parameters"])
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    rows = [r for kind in ("flux", "sd3") for targets in ("attn", "attn+ff") for r in sizes(kind, targets)]
    print(f"{'base':<6}{'targets':<9}{'layers':>7} {'method':<14}{'parameters':>13}{'× LoRA':>8}{'file MB':>9}"
          f"{'as LoRA MB':>11}")
    for r in rows:
        export = r.get("exact_lora_export_mb_at_most")
        print(f"{r['base']:<6}{r['targets']:<9}{r['layers']:>7} {r['method']:<14}{r['parameters']:>13,}"
              f"{r['parameters_vs_lora_r16']:>8.3f}{r['file_mb']:>9.1f}{'' if export is None else f'{export:.1f}':>11}")
    if args.out:
        atomic_write_text(args.out, json.dumps({"command": "python benchmarks/dit_sizes.py --out " + args.out,
                                                "base_configs": "FLUX.1-dev, SD3.5-medium transformer/config.json",
                                                "rows": rows}, indent=2))
        print(f"written {args.out}")


if __name__ == "__main__":
    main()
