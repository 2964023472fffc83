"""`ether-diffusion` command line: a thin layer over the library. User errors exit 2 with one line on stderr."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .console import run_command
from .errors import EtherError
from .pipelines import SCHEDULERS
from .runtime import DEVICES, DTYPES, add_device_arguments, device_and_dtype, resolve_device


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show Python tracebacks for errors")


def cmd_info(args: argparse.Namespace) -> None:
    from .adapter_file import describe, read_adapter_file

    print(describe(read_adapter_file(args.adapter)))


def cmd_generate(args: argparse.Namespace) -> None:
    from .pipelines import generate, set_scheduler

    out = Path(args.out)
    hint = None
    if args.control_image:
        from .data import read_image

        hint = read_image(Path(args.control_image)) if Path(args.control_image).is_file() else None
        if hint is None:
            raise EtherError(f"control image not found or not readable: {args.control_image}")
    device, dtype = device_and_dtype(args)
    pipe = _pipeline_with_adapters(args.base, args.adapter or [], device=device, dtype=dtype)
    if args.scheduler:
        set_scheduler(pipe, args.scheduler)
    images = generate(pipe, args.prompt, negative_prompt=args.negative_prompt, seed=args.seed, steps=args.steps,
                      guidance=args.guidance, num_images=args.num_images, height=args.height, width=args.width,
                      control_image=hint, control_scale=args.control_scale)
    out.mkdir(parents=True, exist_ok=True)
    from .atomic import atomic_write

    for i, image in enumerate(images):
        path = out / f"{args.seed}-{i}.png"
        atomic_write(path, lambda tmp, im=image: im.save(tmp, format="PNG"))
        print(path)


def _pipeline_with_adapters(base: str | None, specs: list[str], default_strength: float = 1.0, *,
                            device="cpu", dtype=None):
    """Load the base (on `device`, in `dtype`) and the given 'FILE[:STRENGTH]' adapters, active in order."""
    import torch

    from .pipelines import load_ether_weights, load_pipeline, parse_adapter_arg, set_ether_adapters

    pipe = load_pipeline(base, dtype=dtype or torch.float32, device=device)
    names, strengths = [], []
    for spec in specs:
        path, strength = parse_adapter_arg(spec, default_strength)
        names.append(load_ether_weights(pipe, path, adapter_name=f"adapter{len(names)}"))
        strengths.append(strength)
    if names:
        set_ether_adapters(pipe, names, strengths)
    return pipe


def cmd_export(args: argparse.Namespace) -> None:
    import torch

    from . import bases, inject
    from .pipelines import pipeline_components
    from .control import control_strengths
    from .export import export_control_encoders, export_lora, export_merged

    # adapters are fused / factorised in fp64 from the fp32 base; --dtype is the precision of what is written
    pipe = _pipeline_with_adapters(args.base, args.adapters, args.strength, device=resolve_device(args.device))
    source = {"adapters": args.adapters, "base": args.base or "embedded", "strength": args.strength}
    if args.dtype is not None:
        dtype = DTYPES[args.dtype]
    elif args.to == "merged":  # as save_pretrained: the precision the base came in
        from .pipelines import stored_dtype

        dtype = stored_dtype(args.base)
    else:  # LoRA files in half precision, as kohya and diffusers write them
        dtype = torch.float16
    if args.to == "merged":
        path = export_merged(pipe, args.out, single_file_unet=args.single_file, dtype=dtype)
        print(f"merged pipeline written to {path}")
    elif any(inject.active_adapters(m) for m in pipeline_components(pipe).values()) or not any(
            control_strengths(bases.denoiser(pipe)).values()):
        info = export_lora(pipe, args.out, style="diffusers" if args.to == "lora" else "kohya", dtype=dtype,
                           source=source)
        print(f"{args.to} file written to {info['path']} ({info['bytes']:,} bytes, ranks {info['ranks']})")
    for path in export_control_encoders(pipe, args.out):
        print(f"control encoder written to {path} (a LoRA cannot hold it: load it beside; see docs/control.md)")


def cmd_data_render(args: argparse.Namespace) -> None:
    from .toyworld.dataset import render_dataset
    from .toyworld.subjects import resolve_subject

    if args.n is not None and args.n < 1:
        raise EtherError(f"--n must be at least 1, got {args.n}")
    subject = resolve_subject(args.subject, args.seed).name
    written = render_dataset(args.kind, args.out, n=args.n, seed=args.seed, subject=subject,
                             control_kind=args.control_kind, layout=args.layout, token=args.token)
    print(f"wrote {written}")


def _lpips_model(choice: str):
    """`none`, a folder (missing files: an error) or `auto` (the usual download places; skipped if absent)."""
    from .lpips import Lpips, locate

    if choice == "none":
        return None
    try:
        return Lpips.from_files(*locate(None if choice == "auto" else choice))
    except EtherError as exc:
        if choice != "auto":
            raise
        print(f"LPIPS diversity skipped: {exc}", file=sys.stderr)
        return None


def cmd_eval(args: argparse.Namespace) -> None:
    import json

    from .atomic import atomic_write_text
    from .data import load_folder
    from .evaluation import Backbones, Sample, generate_protocol, markdown_table, protocol_prompts, score

    out = Path(args.out)
    references = [ex.image for ex in load_folder(args.references, "", what="reference")]
    if not args.images and not (args.token and args.class_word):
        raise EtherError("to generate the protocol's pictures give --token and --class-word (or --images DIR)")
    backbones = Backbones(args.dino, args.clip)  # first, so an unavailable backbone fails before generating
    lpips = _lpips_model(args.lpips)
    if args.images:
        samples = [Sample(ex.image, ex.caption) for ex in load_folder(args.images, "", what="generated images")]
    else:
        prompts = protocol_prompts(args.token, args.class_word, args.live, args.prompts)
        device, dtype = device_and_dtype(args)
        pipe = _pipeline_with_adapters(args.base, args.adapter or [], device=device, dtype=dtype)
        samples = generate_protocol(pipe, prompts, out / "images", args.images_per_prompt, args.seed, args.steps,
                                    args.guidance)
    report = score(samples, references, backbones, token=args.token, lpips=lpips)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "report.json", json.dumps(report, indent=2))
    atomic_write_text(out / "report.md", markdown_table(report))
    print(markdown_table(report) + f"\nwritten {out / 'report.json'} and {out / 'report.md'}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ether-diffusion", description="Personalise diffusion models with ETHER.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="print an adapter file's metadata and parameter count")
    p.add_argument("adapter")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("generate", help="generate images with the base model and optional adapters")
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", required=True, help="output folder for PNG files")
    p.add_argument("--base", default=None, help="diffusers folder or hub id (default: the embedded model)")
    p.add_argument("--adapter", action="append", help="adapter file, optionally FILE:STRENGTH; repeatable")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--scheduler", choices=list(SCHEDULERS), default=None,
                   help="solver (default: the base's own; the embedded model's is DPM++ 2M; FLUX / SD3 bases take "
                        "FlowMatch Euler only)")
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--height", type=int, default=None, help="picture height (default: the base's own size)")
    p.add_argument("--width", type=int, default=None, help="picture width (default: the base's own size)")
    p.add_argument("--control-image", default=None, help="control picture for a control adapter (resized to the output)")
    p.add_argument("--control-scale", type=float, default=1.0, help="multiplies the control encoder's features")
    add_device_arguments(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("export", help="export adapters as a LoRA (diffusers or kohya keys) or a merged pipeline")
    p.add_argument("adapters", nargs="+", metavar="ADAPTER[:STRENGTH]", help="applied in this order")
    p.add_argument("--to", choices=["lora", "kohya", "merged"], required=True,
                   help="lora: diffusers / PEFT keys (diffusers' load_lora_weights); kohya: A1111 / ComfyUI / Forge "
                        "keys (FLUX.1: the original BFL layout with fused q/k/v; none for SD3); merged: a plain "
                        "diffusers pipeline")
    p.add_argument("--out", required=True, help="file (lora, kohya, merged --single-file) or folder (merged)")
    p.add_argument("--base", default=None, help="the base the adapters were trained on (default: embedded)")
    p.add_argument("--strength", type=float, default=1.0, help="strength for adapters given without :STRENGTH")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="precision of what is written (computed in fp64 either way); default: fp16 for lora / "
                        "kohya files (as kohya and diffusers write them), the base's own stored precision for "
                        "merged (as save_pretrained keeps it: an fp32 base stays fp32, so --strength 0 gives the "
                        "base back exactly)")
    p.add_argument("--device", choices=DEVICES, default="auto", help="where to merge / factorise (auto: cuda if present)")
    p.add_argument("--single-file", action="store_true",
                   help="merged: write only the denoiser (UNet or FLUX / SD3 transformer) as one .safetensors")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("eval", help="DINO / CLIP-I / CLIP-T of generated pictures against reference photos")
    p.add_argument("--references", required=True, help="folder of the subject's real photos")
    p.add_argument("--images", default=None, help="score these pictures (prompt of X.png in X.txt) instead of generating")
    p.add_argument("--adapter", action="append", help="adapter FILE[:STRENGTH] to generate with; repeatable")
    p.add_argument("--token", default=None, help="identifier token, e.g. sks (dropped from prompts for CLIP-T)")
    p.add_argument("--class-word", default=None, help="class noun, e.g. dog")
    p.add_argument("--live", action="store_true", help="use the live-subject prompt list (animals) instead of objects")
    p.add_argument("--prompts", default=None, help="JSON with 'object' / 'live' template lists ({token} {cls})")
    p.add_argument("--base", default=None, help="diffusers folder or hub id (default: the embedded model)")
    p.add_argument("--images-per-prompt", type=int, default=4)
    p.add_argument("--seed", type=int, default=0, help="first seed; each picture's seed is recorded")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--dino", default="facebook/dino-vits16", help="DINO ViT folder or hub id")
    p.add_argument("--clip", default="ViT-L/14", help="ViT-L/14, B/32, or a CLIP folder / hub id")
    p.add_argument("--lpips", default="auto", help="folder with alexnet-owt-7be5be79.pth and lpips' alex.pth; "
                   "auto: torch hub's cache + the installed lpips package, skipped if absent; none")
    p.add_argument("--out", required=True, help="folder for images/, report.json, report.md")
    add_device_arguments(p)
    p.set_defaults(func=cmd_eval)

    from .toyworld.control_data import RENDERERS
    from .toyworld.dataset import KINDS, LAYOUTS

    data = sub.add_parser("data", help="write the embedded world's datasets (subject pictures, control pairs, "
                                       "base captions)")
    kinds = data.add_subparsers(dest="data_command", required=True)
    p = kinds.add_parser("render", help="render a toy-world dataset as an imagefolder (metadata.jsonl) or a "
                                        "folder of pictures with .txt captions")
    p.add_argument("--kind", required=True, choices=KINDS)
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--subject", default="core-triangle",
                   help="subject kind: a named subject, random (drawn from --seed) or random-N (default: core-triangle)")
    p.add_argument("--control-kind", default="segmentation", choices=sorted(RENDERERS),
                   help="control kind: the map drawn beside each picture (default: segmentation)")
    p.add_argument("--n", type=int, default=None, help="pictures (default: 5 for subject, 200 otherwise)")
    p.add_argument("--seed", type=int, default=0, help="seeds the scenes (default: 0)")
    p.add_argument("--layout", default="imagefolder", choices=LAYOUTS,
                   help="imagefolder: metadata.jsonl rows for --dataset-name (default); folder: .txt captions for "
                        "--instance-dir, or the metadata.jsonl --data-dir reads for control")
    p.add_argument("--token", default="sks", help="subject kind: the identifier in captions (default: sks)")
    p.set_defaults(func=cmd_data_render)

    from .train.cli import add_train_parser

    add_train_parser(sub)

    from .demo import add_demo_parser

    add_demo_parser(sub)

    from .app import add_app_parser

    add_app_parser(sub)

    for action in sub.choices.values():
        _add_common(action)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: args.func(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
