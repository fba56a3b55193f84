"""Prompt tab: try a LoRA on a base model, compare with the base, and grid checkpoints x strengths."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from core.lora.preview import Previewer
from ui.settings import AppSettings, find_models, lora_choices, model_choices
from ui.widgets import Refresh

ROOT = Path(__file__).resolve().parents[1]


def parse_scales(text: str) -> list[float]:
    try:
        scales = [float(x) for x in text.replace(";", ",").split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"strengths {text!r} must be numbers separated by commas, e.g. 0.5, 0.75, 1") from None
    if not scales:
        raise ValueError("enter at least one strength, e.g. 0.5, 1")
    return scales


def merge_into_model(settings: AppSettings, model: str, lora: str, scale: float, name: str,
                     precision: str = "fp16") -> str:
    """Run ``python -m core merge`` (a subprocess: a model in fp32 must not take the app down) into models/NAME."""
    from core.data.dataset_store import DatasetStoreError, validate_name

    if not model or not lora:
        return "⚠️ pick a base model and a LoRA first"
    try:
        name = validate_name(name or "")
    except DatasetStoreError as exc:
        return f"⚠️ merged model name: {exc}"
    out = settings.models_dir / f"{name}.safetensors"
    if out.exists():
        return f"⚠️ {out} already exists; pick another name"
    proc = subprocess.run([sys.executable, "-m", "core", "merge", "--model", str(model), "--lora", str(lora),
                           "--scale", f"{float(scale):g}", "--out", str(out), "--precision", precision],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          check=False)
    if proc.returncode:
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        return f"⚠️ merge failed: {errors[-1] if errors else proc.stderr.strip()[-500:]}"
    return f"{proc.stdout.strip()}. It is in the model lists now (Refresh lists)."


# ------------------------------------------------------------ handlers (plain functions; build() wires them)

# The Prompt tab's settings, as the handlers read them from the form.
FORM = ("model", "lora", "scale", "prompt", "negative", "seed", "steps", "guidance", "width", "height",
        "grid_loras", "grid_scales")


def image_options(form: dict) -> dict:
    """Seed, steps, guidance, size and negative prompt as Previewer.generate takes them."""
    return dict(seed=int(form["seed"] or 0), steps=int(form["steps"] or 20),
                guidance_scale=float(form["guidance"] or 0), width=int(form["width"] or 512) // 8 * 8,
                height=int(form["height"] or 512) // 8 * 8, negative_prompt=form["negative"])


def generate(previewer: Previewer, form: dict):
    """One image with the picked LoRA (or the base model): (image, message)."""
    import gradio as gr

    lora = form["lora"]
    try:
        image = previewer.generate(form["model"], form["prompt"], lora=lora or None, scale=float(form["scale"]),
                                   **image_options(form))
    except (OSError, ValueError) as exc:
        return gr.skip(), f"⚠️ {exc}"
    return image, f"Generated with {'LoRA ' + lora if lora else 'the base model'} at seed {int(form['seed'] or 0)}."


def compare(previewer: Previewer, form: dict):
    """The base model and the LoRA side by side at the same seed: (pair, message)."""
    import gradio as gr

    if not form["lora"]:
        return gr.skip(), "⚠️ pick a LoRA to compare with the base model"
    options = image_options(form)
    try:
        base = previewer.generate(form["model"], form["prompt"], lora=None, **options)
        with_lora = previewer.generate(form["model"], form["prompt"], lora=form["lora"],
                                       scale=float(form["scale"]), **options)
    except (OSError, ValueError) as exc:
        return gr.skip(), f"⚠️ {exc}"
    return [(base, "base model"), (with_lora, f"with LoRA at {float(form['scale']):g}")], "Same seed, same settings."


def grid(previewer: Previewer, form: dict, progress=None):
    """Checkpoints x strengths in one picture: (grid image, message); ``progress(fraction, desc=...)`` (gradio's)
    is told each picture as it is drawn."""
    import gradio as gr

    files = form["grid_loras"]

    def on_cell(done: int, total: int) -> None:
        if progress is not None:
            progress(done / total, desc=f"picture {done}/{total}")

    try:
        if not files:
            raise ValueError("pick one or more LoRA files for the grid")
        scales = parse_scales(form["grid_scales"])
        image = previewer.grid(form["model"], form["prompt"], list(files), scales, on_cell=on_cell,
                               **image_options(form))
    except (OSError, ValueError) as exc:
        return gr.skip(), f"⚠️ {exc}"
    return image, f"{len(files)} files × {len(scales)} strengths at seed {int(form['seed'] or 0)}."


def lists(settings: AppSettings):
    """Fresh model and LoRA lists: (model, lora, grid LoRAs) updates."""
    import gradio as gr

    files = lora_choices(settings.outputs_dir)
    return gr.update(choices=model_choices(settings.models_dir)), gr.update(choices=files), gr.update(choices=files)


def model_size(model):
    """Default the size to what the model was made for (512 for SD 1.5, 64 for the tiny demo model), and the
    steps and guidance to the flow models' own (FLUX.1-schnell: 4 steps, no guidance)."""
    import gradio as gr

    from core.base.models import native_resolution, sample_defaults

    size = native_resolution(model) if model else None
    sizes = (gr.update(value=size), gr.update(value=size)) if size else (gr.skip(), gr.skip())
    sampling = sample_defaults(model) if model else {}
    steps, guidance = sampling.get("sample.steps"), sampling.get("sample.guidance_scale")
    return (*sizes, gr.update(value=steps) if steps is not None else gr.skip(),
            gr.update(value=guidance) if guidance is not None else gr.skip())


# ------------------------------------------------------------------ layout


def build(settings: AppSettings, previewer: Previewer):
    import gradio as gr

    models = find_models(settings.models_dir)
    loras = lora_choices(settings.outputs_dir)
    with gr.Row():
        with gr.Column(scale=2):
            model = gr.Dropdown(model_choices(settings.models_dir), value=models[0] if models else None,
                                allow_custom_value=True,
                                label="Base model", elem_id="prompt-model")
            lora = gr.Dropdown(loras, value=loras[0][1] if loras else None, label="LoRA", elem_id="prompt-lora",
                               allow_custom_value=True)
            refresh = gr.Button("Refresh lists", elem_id="prompt-refresh", size="sm")
            scale = gr.Slider(0, 2, value=1.0, step=0.05, label="LoRA strength", elem_id="prompt-scale")
            prompt = gr.Textbox("a photo of sks", label="Prompt", lines=2, elem_id="prompt-text")
            negative = gr.Textbox("", label="Negative prompt", elem_id="prompt-negative")
            with gr.Row():
                seed = gr.Number(0, precision=0, label="Seed", elem_id="prompt-seed")
                steps = gr.Number(20, precision=0, minimum=1, maximum=200, label="Steps", elem_id="prompt-steps")
                guidance = gr.Number(7.5, minimum=0, maximum=30, label="Guidance", elem_id="prompt-guidance")
            with gr.Row():
                width = gr.Number(512, precision=0, minimum=64, maximum=2048, step=8, label="Width",
                                  elem_id="prompt-width")
                height = gr.Number(512, precision=0, minimum=64, maximum=2048, step=8, label="Height",
                                   elem_id="prompt-height")
            with gr.Row():
                generate_button = gr.Button("Generate", variant="primary", elem_id="prompt-generate")
                compare_button = gr.Button("Compare with base", elem_id="prompt-compare")
            with gr.Accordion("Merge into the model", open=False, elem_id="prompt-merge-box"):
                gr.Markdown("Fuse the LoRA at the strength above into the base model and save one single-file "
                            "checkpoint in models/ (the layout A1111 and ComfyUI load).")
                merge_name = gr.Textbox(label="Name of the merged model", placeholder="my-model-merged",
                                        elem_id="prompt-merge-name")
                merge_precision = gr.Radio(["fp16", "bf16", "fp32"], value="fp16", label="Precision",
                                           elem_id="prompt-merge-precision")
                merge_button = gr.Button("Merge and save", elem_id="prompt-merge")
            with gr.Accordion("Checkpoints × strengths grid", open=False):
                grid_loras = gr.Dropdown(loras, multiselect=True, label="LoRA files", elem_id="prompt-grid-loras")
                grid_scales = gr.Textbox("0.5, 0.75, 1.0", label="Strengths", elem_id="prompt-grid-scales")
                grid_button = gr.Button("Make grid", elem_id="prompt-grid")
        with gr.Column(scale=3):
            message = gr.Markdown(elem_id="prompt-message")
            output = gr.Image(label="Result", type="pil", elem_id="prompt-output", format="png")
            pair = gr.Gallery(label="Base | LoRA (same seed)", columns=2, elem_id="prompt-compare-output")
            grid_out = gr.Image(label="Grid", type="pil", elem_id="prompt-grid-output", format="png", height=640)

    form = dict(zip(FORM, [model, lora, scale, prompt, negative, seed, steps, guidance, width, height, grid_loras,
                           grid_scales], strict=True))
    inputs = set(form.values())

    def values(data: dict) -> dict:
        picked = {name: data[component] for name, component in form.items()}
        return {**picked, "model": settings.resolve(picked["model"])}  # models/x relative to the app's home

    # Named functions: gradio's API names for the events (scripts and tests call them by these).
    def on_generate(data):
        return generate(previewer, values(data))

    def on_compare(data):
        return compare(previewer, values(data))

    def on_grid(data, progress=gr.Progress()):  # noqa: B008 - gradio's way to show per-picture progress
        return grid(previewer, values(data), progress)

    def on_refresh():
        return lists(settings)

    model.change(model_size, model, [width, height, steps, guidance])
    generate_button.click(on_generate, inputs, [output, message])
    compare_button.click(on_compare, inputs, [pair, message])
    grid_button.click(on_grid, inputs, [grid_out, message])
    refresh.click(on_refresh, outputs=[model, lora, grid_loras])
    merge_button.click(lambda m, lo, sc, n, pr: merge_into_model(settings, m, lo, sc, n, pr),
                       [model, lora, scale, merge_name, merge_precision], message)
    return {"lists": Refresh(on_refresh, [], [model, lora, grid_loras]), "lora": lora, "model": model, "scale": scale,
            # On load: fresh lists, and the size of the picked model (not 512 for a 64 px model).
            "on_load": [Refresh(on_refresh, [], [model, lora, grid_loras]),
                        Refresh(model_size, [model], [width, height, steps, guidance])]}
