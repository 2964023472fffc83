"""`ether-diffusion app`: a Gradio UI over `Studio` (pick adapters, set strengths, compare, sweep).

Binds to 127.0.0.1 unless --host says otherwise; never shares publicly; requests go through Gradio's queue one at
a time; the UI only reads adapter files from the adapters folder and from uploads it validated itself.
"""

from __future__ import annotations

import inspect
import os
import random
from pathlib import Path

from .errors import EtherError
from .paths import default_adapters_dir
from .runtime import add_device_arguments, resolve_device, resolve_dtype
from .studio import LIMITS, Request, Studio

NONE = "(none)"
SLOTS = 3


# The `/generate` inputs before the adapter slots, with the defaults gradio_client callers get
FIXED_INPUTS = (("prompt", inspect.Parameter.empty), ("negative_prompt", ""), ("seed", 0), ("random_seed", False),
                ("steps", 20), ("guidance", 7.5), ("scheduler", "DPM++ 2M"), ("num_images", 1), ("size", None),
                ("mode", "single"))


def api_signature(slots: int, progress, scheduler: str = "DPM++ 2M") -> inspect.Signature:
    """The `/generate` endpoint's parameters as gradio_client callers see them: meaningful names, and defaults
    (so optional) for everything but the prompt: `adapter_1`, `strength_1`, …, `control_image`. `scheduler`: the
    default solver (the base's: FLUX / SD3 take FlowMatch Euler)."""
    P = inspect.Parameter
    fixed = [(name, scheduler if name == "scheduler" else default) for name, default in FIXED_INPUTS]
    names = [*fixed, *((f"adapter_{i + 1}", NONE) for i in range(slots)),
             *((f"strength_{i + 1}", 1.0) for i in range(slots)), ("control_image", None)]
    params = [P(name, P.POSITIONAL_OR_KEYWORD, default=default) for name, default in names]
    return inspect.Signature([*params, P("progress", P.KEYWORD_ONLY, default=progress)])


def build_app(studio: Studio, slots: int = SLOTS):
    import gradio as gr

    def choices():
        return [NONE, *studio.list_adapters()]

    def describe(*names):
        lines = []
        for name in names:
            if name in (None, NONE):
                continue
            try:
                d = studio.describe(name)
            except EtherError as exc:
                lines.append(f"**{name}**: ⚠️ {exc}")
                continue
            needs = f" · needs a **{d['control']}** control image" if d["control"] else ""
            lines.append(f"**{name}**: trigger `{d['trigger']}` · {d['method']} · {d['n_blocks']} block(s) · "
                         f"{d['parameters']:,} parameters · base `{d['base_model']}` · parts "
                         f"{', '.join(d['components']) or 'control encoder'}{needs}")
        return "\n\n".join(lines) or "No adapter selected: the base model draws."

    def insert_trigger(prompt, *names):
        for name in names:
            if name not in (None, NONE):
                try:
                    trigger = studio.describe(name)["trigger"]
                except EtherError:
                    continue
                if trigger and trigger not in prompt:
                    return f"{trigger} {prompt}".strip()
        return prompt

    def upload(path):
        unchanged = [gr.update() for _ in range(slots)]
        if not path:
            return *unchanged, "No file."
        try:
            name = studio.add_upload(path)
        except EtherError as exc:
            return *unchanged, f"⚠️ Upload refused: {exc}"
        return *[gr.update(choices=choices()) for _ in range(slots)], f"Added `{name}`."

    def run(*values, progress=gr.Progress()):
        """Positional values in the order of `api_signature` (named so for gradio_client callers)."""
        progress(0, desc="generating")
        fixed = len(FIXED_INPUTS)
        prompt, negative, seed, random_seed, steps, guidance, scheduler, num_images, size, mode = values[:fixed]
        names, strengths = values[fixed : fixed + slots], values[fixed + slots : fixed + 2 * slots]
        hint = values[fixed + 2 * slots] if len(values) > fixed + 2 * slots else None
        adapters = [(n, float(s)) for n, s in zip(names, strengths) if n not in (None, NONE)]
        seed = random.randint(0, 2**31 - 1) if random_seed else int(seed)
        req = Request(prompt=prompt, negative_prompt=negative, seed=seed, steps=int(steps), guidance=float(guidance),
                      num_images=int(num_images), scheduler=scheduler, size=int(size) if size else None, mode=mode,
                      control_image=hint)
        try:
            images = studio.run(req, adapters)
        except EtherError as exc:
            raise gr.Error(str(exc)) from None
        return images, f"seed {seed} · {len(images)} image(s)"

    default_scheduler = "DPM++ 2M" if "DPM++ 2M" in studio.schedulers else studio.schedulers[0]
    run.__signature__ = api_signature(slots, gr.Progress(), default_scheduler)

    with gr.Blocks(title="ether-diffusion") as app:
        gr.Markdown("## ether-diffusion · sample from ETHER adapters")
        with gr.Row():
            with gr.Column(scale=1):
                # what every run needs sits together at the top (as in A1111 / Fooocus); the rest is folded away
                with gr.Row(equal_height=True):
                    prompt = gr.Textbox(label="Prompt", elem_id="prompt", scale=4,
                                        value="a large red circle on a white background")
                    go = gr.Button("Generate", variant="primary", elem_id="generate", scale=1)
                dropdowns, sliders = [], []
                for i in range(slots):
                    with gr.Row():
                        dropdowns.append(gr.Dropdown(choices(), value=NONE, label=f"Adapter {i + 1}",
                                                     elem_id=f"adapter{i}", allow_custom_value=False))
                        sliders.append(gr.Slider(*LIMITS["strength"], value=1.0, step=0.05, label="strength",
                                                 elem_id=f"strength{i}"))
                with gr.Row():
                    info = gr.Markdown(describe(), elem_id="adapter-info")
                    insert = gr.Button("Insert trigger prompt", elem_id="insert", size="sm")
                mode = gr.Radio(["single", "compare", "sweep"], value="single", label="mode",
                                info="compare: base vs adapted, same seed · sweep: first adapter over strengths")
                with gr.Accordion("Negative prompt and settings", open=False):
                    negative = gr.Textbox("", label="Negative prompt", elem_id="negative")
                    with gr.Row():
                        seed = gr.Number(0, label="seed", precision=0, elem_id="seed")
                        random_seed = gr.Checkbox(False, label="random seed")
                    steps = gr.Slider(*LIMITS["steps"], value=20, step=1, label="steps")
                    guidance = gr.Slider(*LIMITS["guidance"], value=7.5, step=0.5, label="guidance")
                    scheduler = gr.Dropdown(studio.schedulers, value=default_scheduler, label="scheduler")
                    num_images = gr.Slider(*LIMITS["num_images"], value=2, step=1, label="images")
                    size = gr.Slider(studio.size_multiple, studio.native_size * 2, value=studio.native_size,
                                     step=studio.size_multiple, label="size (px)")
                with gr.Accordion("Upload an adapter", open=False):
                    uploaded = gr.File(label="Adapter file (.safetensors)", file_types=[".safetensors"],
                                       type="filepath", elem_id="upload")
                    upload_status = gr.Markdown(elem_id="upload-status")
                with gr.Accordion("Control image (for control adapters)", open=False):
                    control = gr.Image(label="Control image (segmentation / edge map)", type="pil",
                                       elem_id="control-image", image_mode="RGB")
            with gr.Column(scale=1):
                gallery = gr.Gallery(label="Results", elem_id="gallery", columns=4, format="png", height="auto")
                status = gr.Markdown(elem_id="status")
        for dd in dropdowns:
            dd.change(describe, dropdowns, info, api_name=False)
        insert.click(insert_trigger, [prompt, *dropdowns], prompt, api_name=False)
        uploaded.upload(upload, uploaded, [*dropdowns, upload_status], api_name="upload")
        go.click(run, [prompt, negative, seed, random_seed, steps, guidance, scheduler, num_images, size, mode,
                       *dropdowns, *sliders, control], [gallery, status], api_name="generate")
    return app


def launch(base: str | None, adapters_dir: str | Path | None, host: str = "127.0.0.1", port: int = 7860,
           block: bool = True, device: str = "auto", dtype: str = "auto", offload: bool = False):
    """Load the base once, build the UI, start the server (queued, one request at a time).

    `offload` keeps the models in CPU memory and moves each to the GPU only while it runs (diffusers' model CPU
    offload), for GPUs too small to hold the whole pipeline.
    """
    from .pipelines import load_pipeline

    try:
        import gradio  # noqa: F401
    except ImportError:
        raise EtherError("the app needs gradio: pip install 'ether-diffusion[app]'") from None
    adapters_dir = Path(adapters_dir) if adapters_dir else default_adapters_dir()
    adapters_dir.mkdir(parents=True, exist_ok=True)
    where = resolve_device(device)
    if offload and where.type != "cuda":
        raise EtherError("--offload moves models to a CUDA GPU while they run; it needs --device cuda (or auto on a GPU)")
    pipe = load_pipeline(base, dtype=resolve_dtype(dtype, where), device="cpu" if offload else where)
    if offload:
        pipe.enable_model_cpu_offload(device=where)
    studio = Studio(pipe, adapters_dir)
    app = build_app(studio)
    app.queue(default_concurrency_limit=1)
    app.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=not block, show_error=True)
    return app


def add_app_arguments(p) -> None:
    """The app's options; each defaults to an environment variable where one is named (as a Space sets them)."""
    env = os.environ.get
    p.add_argument("--base", default=env("ETHER_BASE"),
                   help="diffusers folder or hub id (env ETHER_BASE; default: the embedded model)")
    p.add_argument("--adapters-dir", default=env("ETHER_ADAPTERS_DIR"),
                   help="adapter files to offer (env ETHER_ADAPTERS_DIR; default: "
                        "$XDG_DATA_HOME/ether-diffusion/adapters, else ~/.local/share/ether-diffusion/adapters)")
    p.add_argument("--host", default=env("GRADIO_SERVER_NAME", "127.0.0.1"), help="env GRADIO_SERVER_NAME")
    p.add_argument("--port", type=int, default=env("GRADIO_SERVER_PORT", "7860"), help="env GRADIO_SERVER_PORT")
    add_device_arguments(p)
    p.add_argument("--offload", action="store_true",
                   help="small GPUs: keep models in CPU memory, each moved to the GPU only while it runs")
    p.set_defaults(func=lambda a: launch(a.base, a.adapters_dir, a.host, a.port, device=a.device, dtype=a.dtype,
                                         offload=a.offload))


def add_app_parser(sub) -> None:
    add_app_arguments(sub.add_parser("app", help="Gradio app to sample from adapters"))


def main(argv: list[str] | None = None) -> int:
    """The app as a program of its own (a Hugging Face Space's app.py calls this): same options as
    `ether-diffusion app`, user errors as one line and exit status 2."""
    import argparse

    from .console import run_command

    parser = argparse.ArgumentParser(prog="app.py", description="ether-diffusion: sample from ETHER adapters")
    add_app_arguments(parser)
    args = parser.parse_args(argv)
    return run_command(lambda: args.func(args))
