"""`ether-diffusion demo`: the whole personalisation loop on the embedded base model, offline, on a CPU.

Render a held-out toy-world subject (one exact instance of a family the base model draws in many variants, as a
user's dog is one of Stable Diffusion's many dogs), train an ETHER+ DreamBooth adapter with prior preservation
through the real training code, then draw the subject in new contexts with the base model and with the adapter
(same seeds), check that the class prompt still draws the family rather than the subject, and score everything
with the toy-world checker.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from .atomic import atomic_write, atomic_write_text
from .control import INJECTIONS
from .control_demo import ControlDemoSettings, run_control_demo
from .errors import EtherError
from .pipelines import disable_ether, enable_ether, generate, image_grid, load_pipeline, pipeline_components
from .runtime import add_device_arguments, mixed_precision_for, resolve_device, resolve_dtype
from .toyworld import checker, world
from .toyworld.control_data import RENDERERS
from .toyworld.subjects import get_subject, resolve_subject
from .toyworld.dataset import subject_rows, write_caption_folder
from .toyworld.evaluate import judge, subject_prompts
from .train import DreamBoothConfig, train_dreambooth


@dataclass
class DemoSettings:
    out: str = "ether-demo"
    base: str | None = None
    subject: str = "core-triangle"
    token: str = "sks"
    method: str = "etherplus"
    train_text_encoder: bool = True  # the identifier's colour lives in the text encoder: adapt it too
    instance_images: int = 5
    class_images: int = 16
    # The paper's recipe is 1,400 steps at 6e-3 with prior weight 1; on the four subjects of docs/measurements.md
    # (ringed triangle, striped circle, random-11, random-22) 600 steps at 2e-2 with a tenth of the prior weight
    # match the exact subject more often on every one (mean 0.51 against 0.44) in 43% of the steps.
    max_steps: int = 600
    learning_rate: float = 2e-2
    prior_loss_weight: float = 0.1
    seeds: int = 4
    sampling_steps: int = 40  # ringed triangle, base 2.5, seeds 0–3: mean match 0.50 at 20 steps, 0.68 at 30, 0.69 at 40
    guidance: float = 7.5
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"


def instance_prompt(settings: DemoSettings) -> str:
    return world.subject_caption(get_subject(settings.subject), "white", token=settings.token)


def class_prompt(settings: DemoSettings) -> str:
    return world.subject_caption(get_subject(settings.subject), "white")


def render_instances(settings: DemoSettings, folder: Path) -> None:
    """The user's 'photos' (`ether-diffusion data render --kind subject --layout folder`): the subject at both sizes
    and different places, on white and gray only (black is left for the new contexts), each with a `.txt` caption
    saying what it shows, as kohya-style datasets do."""
    write_caption_folder(subject_rows(settings.subject, settings.instance_images, settings.seed, settings.token),
                         folder)


def _sample(pipe, settings: DemoSettings, text: str) -> list[Image.Image]:
    return generate(pipe, text, seed=settings.seed, steps=settings.sampling_steps, guidance=settings.guidance,
                    num_images=settings.seeds)


def score(pipe, settings: DemoSettings, adapted: bool) -> tuple[dict, list[list[Image.Image]]]:
    """Subject and prompt fidelity over every context prompt × seed, where each miss lies (family and colours,
    exact geometry, background and size: `evaluate.judge`), and class drift (how often the class prompt draws the
    subject itself); also the images, one row per context prompt and one for the class prompt."""
    (enable_ether if adapted else disable_ether)(pipe)
    rows, judged = [], []
    prompts = subject_prompts(settings.token, settings.subject)
    for prompt in tqdm(prompts, desc="sampling adapted" if adapted else "sampling base"):
        row = _sample(pipe, settings, prompt.text)
        rows.append(row)
        judged += [judge(image, prompt, settings.subject) for image in row]
    class_row = _sample(pipe, settings, class_prompt(settings))
    rows.append(class_row)
    class_scores = [checker.subject_similarity(image, get_subject(settings.subject)) for image in class_row]
    enable_ether(pipe)
    n = len(judged)
    return {
        "subject_fidelity": sum(j["similarity"] for j in judged) / n,
        "subject_match_rate": sum(j["similarity"] >= checker.SUBJECT_MATCH for j in judged) / n,
        "identity_rate": sum(j["identity"] for j in judged) / n,
        "context_rate": sum(j["context"] for j in judged) / n,
        "prompt_fidelity": sum(j["prompt"] for j in judged) / n,
        "class_drift": sum(v >= checker.SUBJECT_MATCH for v in class_scores) / len(class_scores),
        "images": n,
    }, rows


def _markdown(report: dict) -> str:
    b, a = report["base"], report["adapted"]
    rows = [f"| {name} | {r['subject_fidelity']:.3f} | {r['subject_match_rate']:.2f} | {r['prompt_fidelity']:.2f} | "
            f"{r['class_drift']:.2f} |" for name, r in (("base", b), ("adapted", a))]
    lines = [
        f"# ether-diffusion demo: `{report['subject']}` ({report['method']})", "",
        f"Subject: {report['subject_description']}. Instance prompt `{report['instance_prompt']}` (each picture "
        f"also has a caption naming its size and background), {report['settings']['instance_images']} instance "
        f"images, class prompt `{report['class_prompt']}` with {report['settings']['class_images']} class images "
        f"(loss weight {report['settings']['prior_loss_weight']:g}), {report['settings']['max_steps']} steps at "
        f"{report['settings']['learning_rate']:g}, {report['trainable_parameters']:,} trainable parameters, "
        f"wall time {report['seconds']['total']:.0f} s.", "",
        "| model | subject fidelity | subject match rate | prompt fidelity | class drift |", "|---|---|---|---|---|",
        *rows, "",
        "Subject fidelity: for each of the subject's colours, the share of the object's pixels where its exact "
        "pattern puts that colour that show it, averaged over the colours, times the shape overlap (toy-world "
        "checker, the stand-in for DINO/CLIP-I); a match is a score of at least "
        f"{checker.SUBJECT_MATCH}, which no other member of the subject's family reaches. Prompt fidelity: share of "
        "pictures showing the subject's family (shape and pattern kind) on the background and at the size the prompt "
        "asks for (the stand-in for CLIP-T). Class drift: share of class-prompt pictures that match the subject "
        "(prior preservation keeps it low).", "",
        "![grid](grid.png)", "",
        f"Grid rows: {'; '.join(report['prompts'])}; then the class prompt. Columns: {report['settings']['seeds']} "
        "seeds of the base model, then the same seeds with the adapter.",
    ]
    return "\n".join(lines) + "\n"


def dreambooth_config(settings: DemoSettings, instance_dir: Path, output_dir: Path, class_dir: Path,
                      **overrides) -> DreamBoothConfig:
    """The demo's training run: its instance pictures and captions, prior preservation on the class prompt,
    one checkpoint at the end. The pictures are centre-cropped and never flipped, so each one's VAE posterior is
    computed once (the same latents, about a tenth less training time). Benchmarks reuse it with other methods
    and learning rates (`overrides`)."""
    values = dict(
        instance_dir=str(instance_dir), instance_prompt=instance_prompt(settings), output_dir=str(output_dir),
        base=settings.base, method=settings.method, max_steps=settings.max_steps, device=settings.device,
        train_text_encoder=settings.train_text_encoder, learning_rate=settings.learning_rate, seed=settings.seed,
        with_prior_preservation=True, prior_loss_weight=settings.prior_loss_weight,
        class_prompt=class_prompt(settings), class_dir=str(class_dir),
        num_class_images=settings.class_images, sample_batch_size=8, class_generation_steps=settings.sampling_steps,
        checkpointing_steps=settings.max_steps, checkpoints_total_limit=1, cache_latents=True,
    )
    return DreamBoothConfig(**{**values, **overrides})


def run_demo(settings: DemoSettings) -> dict:
    """Run the demo and return its report (also written to OUT/report.json and OUT/report.md)."""
    subject = resolve_subject(settings.subject, settings.seed)
    settings = replace(settings, subject=subject.name)  # `random` becomes the random-N it names
    out = Path(settings.out)
    times = {}
    t0 = time.time()
    device = resolve_device(settings.device)  # an absent GPU is refused before any work
    dtype = resolve_dtype(settings.dtype, device)
    render_instances(settings, out / "instance")
    pipe = load_pipeline(settings.base, dtype=dtype, device=device)
    times["load"] = time.time() - t0
    cfg = dreambooth_config(settings, out / "instance", out, out / "class",
                            mixed_precision=mixed_precision_for(dtype))
    t1 = time.time()
    adapter_path = train_dreambooth(cfg, pipe=pipe)
    times["train"] = time.time() - t1
    t2 = time.time()
    base_scores, base_rows = score(pipe, settings, adapted=False)
    adapted_scores, adapted_rows = score(pipe, settings, adapted=True)
    times["evaluate"] = time.time() - t2
    grid = image_grid([b + a for b, a in zip(base_rows, adapted_rows)])
    grid = grid.resize((grid.width * 2, grid.height * 2), Image.Resampling.NEAREST)
    atomic_write(out / "grid.png", lambda tmp: grid.save(tmp, format="PNG"))
    times["total"] = time.time() - t0
    from .inject import count_parameters

    report = {
        "subject": settings.subject, "subject_description": subject.description,
        "method": settings.method, "instance_prompt": cfg.instance_prompt, "class_prompt": cfg.class_prompt,
        "prompts": [p.text for p in subject_prompts(settings.token, settings.subject)],
        "base": base_scores, "adapted": adapted_scores, "trainable_parameters": sum(count_parameters(m) for m in pipeline_components(pipe).values()),
        "adapter": str(adapter_path), "seconds": {k: round(v, 1) for k, v in times.items()},
        "settings": asdict(settings),
    }
    atomic_write_text(out / "report.json", json.dumps(report, indent=2))
    atomic_write_text(out / "report.md", _markdown(report))
    return report


def add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="train and compare a subject (or, with --task control, a control) adapter on the "
                                    "embedded model (CPU, minutes)")
    defaults, control = DemoSettings(), ControlDemoSettings()
    p.add_argument("--task", choices=["subject", "control"], default="subject",
                   help="subject: DreamBooth on one rendered subject; control: a control adapter on rendered "
                        "segmentation or edge maps (default: subject)")
    p.add_argument("--out", default=None, help=f"output folder (default: {defaults.out}, control: {control.out})")
    p.add_argument("--subject", default=None,
                   help=f"subject: {', '.join(world.SUBJECTS)}, random (a subject drawn from --seed) or random-N "
                        f"(default: {defaults.subject})")
    p.add_argument("--method", default=None, choices=["ether", "etherplus"],
                   help=f"subject: the adapter (default: {defaults.method})")
    p.add_argument("--train-text-encoder", action=argparse.BooleanOptionalAction, default=None,
                   help="subject: also adapt the text encoder's attention (default: on)")
    p.add_argument("--max-steps", type=int, default=None,
                   help=f"(default: {defaults.max_steps}, control: {control.max_steps})")
    p.add_argument("--learning-rate", type=float, default=None,
                   help=f"(default: {defaults.learning_rate:g}, control: {control.learning_rate:g})")
    p.add_argument("--class-images", type=int, default=None,
                   help=f"subject: prior-preservation pictures of the class (default: {defaults.class_images})")
    p.add_argument("--prior-loss-weight", type=float, default=None,
                   help=f"subject: weight of the class pictures' loss (default: {defaults.prior_loss_weight:g}; the "
                        "paper's 1 with 1,400 steps at 6e-3)")
    p.add_argument("--seeds", type=int, default=defaults.seeds, help="images per prompt (control: per map) and model")
    p.add_argument("--sampling-steps", type=int, default=None,
                   help=f"(default: {defaults.sampling_steps}, control: {control.sampling_steps})")
    p.add_argument("--seed", type=int, default=defaults.seed,
                   help="seeds the instance placements (control: the training pairs), class pictures, training and "
                        "sampling (default: 0)")
    p.add_argument("--kind", choices=sorted(RENDERERS), default=None,
                   help=f"control: the kind of map (default: {control.kind})")
    p.add_argument("--control-injection", choices=INJECTIONS, default=None,
                   help="control: where the map's features enter the UNet, conv_in (the paper's setting) or "
                        f"multiscale (default: {control.injection})")
    p.add_argument("--pairs", type=int, default=None, help=f"control: rendered training pairs "
                                                           f"(default: {control.pairs})")
    p.add_argument("--maps", type=int, default=None, help=f"control: held-out maps drawn and scored "
                                                          f"(default: {control.maps})")
    p.add_argument("--base", default=None, help=argparse.SUPPRESS)
    add_device_arguments(p)
    p.set_defaults(func=cmd_demo)


# flag name -> settings field, for the flags only one task reads
SUBJECT_ONLY = {"subject": "subject", "method": "method", "train_text_encoder": "train_text_encoder",
                "class_images": "class_images", "prior_loss_weight": "prior_loss_weight"}
CONTROL_ONLY = {"kind": "kind", "control_injection": "injection", "pairs": "pairs", "maps": "maps"}
SHARED = {k: k for k in ("out", "max_steps", "learning_rate", "sampling_steps")}


def _given(args: argparse.Namespace, flags: dict[str, str]) -> dict:
    """The settings the user gave among `flags`; the task's own defaults fill the rest."""
    return {field: getattr(args, flag) for flag, field in flags.items() if getattr(args, flag) is not None}


def _refuse_other_task(args: argparse.Namespace, other: dict[str, str], other_task: str) -> None:
    """A flag of the other task would be silently ignored: say so instead of running without it."""
    given = ["--" + flag.replace("_", "-") for flag in other if getattr(args, flag) is not None]
    if given:
        raise EtherError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for `demo --task {other_task}`; "
                         f"this is `demo --task {args.task}`")


def cmd_demo(args: argparse.Namespace) -> None:
    if args.task == "control":
        cmd_control_demo(args)
        return
    _refuse_other_task(args, CONTROL_ONLY, "control")
    given = _given(args, {**SHARED, **SUBJECT_ONLY})
    given["subject"] = resolve_subject(given.get("subject", DemoSettings.subject), args.seed).name
    settings = replace(DemoSettings(base=args.base, seeds=args.seeds, seed=args.seed, device=args.device,
                                    dtype=args.dtype), **given)
    report = run_demo(settings)
    out = Path(settings.out).resolve()
    b, a = report["base"], report["adapted"]
    print(f"\nsubject match rate: base {b['subject_match_rate']:.2f} → adapted {a['subject_match_rate']:.2f}; "
          f"prompt fidelity: base {b['prompt_fidelity']:.2f} → adapted {a['prompt_fidelity']:.2f}; "
          f"class drift: base {b['class_drift']:.2f} → adapted {a['class_drift']:.2f}")
    print(f"outputs in {out}: ether_adapter.safetensors, grid.png, report.md, report.json "
          f"({report['seconds']['total']:.0f} s)")


def cmd_control_demo(args: argparse.Namespace) -> None:
    _refuse_other_task(args, SUBJECT_ONLY, "subject")
    settings = replace(ControlDemoSettings(base=args.base, seeds=args.seeds, seed=args.seed, device=args.device,
                                           dtype=args.dtype),
                       **_given(args, {**SHARED, **CONTROL_ONLY}))
    report = run_control_demo(settings)
    b, a = report["base"], report["adapted"]
    print(f"\nmean IoU with the map: base {b['mean_iou']:.2f} → adapted {a['mean_iou']:.2f}; above 0.5: base "
          f"{b['iou_over_0.5']:.2f} → adapted {a['iou_over_0.5']:.2f}; caption colour right: base "
          f"{b['accuracy']['colour']:.2f} → adapted {a['accuracy']['colour']:.2f}")
    print(f"outputs in {Path(settings.out).resolve()}: ether_control.safetensors, grid.png, report.md, report.json "
          f"({report['seconds']['total']:.0f} s)")
