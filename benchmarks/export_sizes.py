"""File sizes of native ETHER adapters vs their exact LoRA exports, on the SD-1.5 UNet shape (random weights).

    python benchmarks/export_sizes.py [--out docs/benchmarks/export-sizes.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from ether_diffusion import AdapterConfig, add_adapter, unload_adapters
from ether_diffusion.adapter_file import save_adapter
from ether_diffusion.export import export_lora
from ether_diffusion.inject import adapter_modules

CASES = [("ether", 1), ("ether", 4), ("etherplus", 1), ("etherplus", 4)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(cross_attention_dim=768).requires_grad_(False)  # SD-1.5 shape
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method, n in CASES:
            add_adapter(unet, "a", AdapterConfig(method=method, n_blocks=n, targets="attn"))
            with torch.no_grad():  # trained-like vectors: away from the identity init
                for adapter in adapter_modules(unet, "a").values():
                    for p in adapter.vectors.values():
                        p.normal_()
            native = save_adapter(Path(tmp) / "a.safetensors", {"unet": unet}, "a").stat().st_size
            row = {"method": method, "n_blocks": n, "native_bytes": native}
            for dtype_name, dtype in (("fp16", torch.float16), ("fp32", torch.float32)):
                t0 = time.perf_counter()
                info = export_lora(SimpleNamespace(unet=unet), Path(tmp) / "l.safetensors", dtype=dtype)
                row[f"lora_{dtype_name}_bytes"] = info["bytes"]
                row[f"lora_{dtype_name}_seconds"] = round(time.perf_counter() - t0, 1)
                row["lora_ranks"] = info["ranks"]
            rows.append(row)
            unload_adapters(unet)
    print(f"{'method':10s} {'n':>2s} {'native KB':>10s} {'LoRA fp16 KB':>13s} {'LoRA fp32 KB':>13s} ranks")
    for r in rows:
        print(f"{r['method']:10s} {r['n_blocks']:2d} {r['native_bytes'] / 1024:10.1f} "
              f"{r['lora_fp16_bytes'] / 1024:13.1f} {r['lora_fp32_bytes'] / 1024:13.1f} {r['lora_ranks']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"unet": "SD-1.5 shape, random weights", "targets": "attn", "rows": rows},
                                       indent=2))


if __name__ == "__main__":
    main()
