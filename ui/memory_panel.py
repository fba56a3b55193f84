"""The Train tab's GPU memory line and its Fit my GPU button (over core.training.plan).

The line follows every setting that changes the estimate; the button applies
the planner's fastest settings predicted to fit the card. ``to_config`` (the
tab's form -> TrainConfig, not validated for paths) is passed in, so this
panel knows nothing else of the form.
"""

from __future__ import annotations

import html
from typing import Any

from core.config import ConfigError
from ui.widgets import Refresh, form_updates


def card_memory() -> tuple[float, str]:
    """(GB, name) of this machine's GPU for the memory line; (0, reason) without one."""
    from core.training.plan import GiB, detect_card

    vram, card, _ = detect_card()
    return (round(vram / GiB, 1), card) if vram else (0.0, card)


def _plan_inputs(to_config, values: dict[str, Any], vram_gb):
    """(config, architecture, vram bytes, card label) for the planner, or a message saying what is missing."""
    from core.base.architecture import of_model
    from core.training.plan import GiB

    try:
        config = to_config(values)
    except ConfigError as exc:
        return f"Memory estimate: fix the settings first ({exc})"
    if not config.model.path and config.model.family == "auto":
        return "Pick a model to see the estimated GPU memory."
    from core.base.families import FamilyError

    try:
        arch = of_model(config.model.path, config.model.family)
    except FamilyError:
        return ("Memory estimate: this model is not on this computer yet, so its family is unknown; set "
                "Family (under Advanced) to estimate it now.")
    except Exception as exc:  # noqa: BLE001 - CheckpointError, unreadable folders
        return f"Memory estimate: {exc}"
    gb, (found_gb, found) = float(vram_gb or 0), card_memory()
    card = found if gb and gb == found_gb else f"{gb:g} GB entered"
    return config, arch, (int(gb * GiB) if gb > 0 else None), card


def memory_line(plan) -> str:
    from core.training.plan import GiB

    peak = plan.peak / GiB
    if plan.vram is None:
        return (f'<span id="memory-estimate">Estimated peak GPU memory {peak:.1f} GB (while '
                f'{plan.peak_phase}). Enter your GPU\'s memory to check that it fits.</span>')
    colour = "inherit" if plan.fits else "#d32f2f"
    verdict = "" if plan.fits else ": <b>does not fit</b>, try Fit my GPU"
    return (f'<span id="memory-estimate" style="color:{colour}">Estimated peak GPU memory {peak:.1f} GB of your '
            f'{plan.vram / GiB:.0f} GB ({html.escape(plan.card)}){verdict}</span>')


def memory_estimate(to_config, values: dict[str, Any], vram_gb) -> str:
    """The live "Estimated peak GPU memory" line; ``to_config`` turns the form's values into a TrainConfig."""
    from core.training.plan import estimate

    inputs = _plan_inputs(to_config, values, vram_gb)
    if isinstance(inputs, str):
        return html.escape(inputs)
    return memory_line(estimate(*inputs))


def fit_gpu(to_config, keys: list[str], values: dict[str, Any], vram_gb) -> list:
    """Fit my GPU: the planner's fastest settings that fit, applied to the form; then the memory line."""
    import gradio as gr

    from core.training.plan import fit

    inputs = _plan_inputs(to_config, values, vram_gb)
    if isinstance(inputs, str) or inputs[2] is None:
        message = inputs if isinstance(inputs, str) else "Enter your GPU's memory (GB) first."
        return [gr.skip()] * len(keys) + [html.escape(message)]
    plan = fit(*inputs)
    return form_updates(keys, dict(plan.settings)) + [memory_line(plan)]


def memory_widgets():
    """The card's memory (filled in from the GPU found), Fit my GPU, and the estimate line."""
    import gradio as gr

    gb, card = card_memory()
    with gr.Row():
        vram = gr.Number(gb, label="Your GPU memory (GB)", minimum=0, info=card, elem_id="train-vram", scale=1)
        fit_button = gr.Button("Fit my GPU", elem_id="train-fit", scale=1)
    memory = gr.HTML(elem_id="train-memory")
    return vram, fit_button, memory


def wire_memory(to_config, components: dict, vram, fit_button, memory) -> Refresh:
    """The estimate follows every setting that changes it; Fit my GPU rewrites the form and the line.
    Returns the page-load refresh of the line."""
    keys = {comp: key for key, comp in components.items()}
    inputs = set(components.values()) | {vram}
    order = [*components.values(), vram]

    def as_values(data: dict) -> dict[str, Any]:
        return {keys[c]: v for c, v in data.items() if c in keys}

    def on_memory(data):
        return memory_estimate(to_config, as_values(data), data.get(vram))

    def on_fit(data):
        return fit_gpu(to_config, list(components), as_values(data), data.get(vram))

    from core.training.plan import ESTIMATE_KEYS

    for key in ESTIMATE_KEYS:  # the memory line follows every setting the estimate reads
        components[key].change(on_memory, inputs=inputs, outputs=memory, show_progress="hidden")
    vram.change(on_memory, inputs=inputs, outputs=memory, show_progress="hidden")
    fit_button.click(on_fit, inputs=inputs, outputs=[*components.values(), memory])
    return Refresh(lambda *values: on_memory(dict(zip(order, values, strict=True))), order, [memory])
