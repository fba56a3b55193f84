"""Gradio widgets generated from the config's field metadata (label, help, range, choices)."""

from __future__ import annotations

import typing
from collections.abc import Callable
from typing import Any, NamedTuple

from ui.settings import AppSettings, find_models, model_choices


class Refresh(NamedTuple):
    """What a tab shows afresh when a page loads: ``fn(*inputs)`` fills ``outputs``, in their order."""

    fn: Callable
    inputs: list
    outputs: list


def form_updates(keys: list[str], flat: dict[str, Any]) -> list:
    """gradio updates for form fields ``keys`` (in order) from ``{"section.key": value}``; others untouched.
    List values become one item per line, as the form shows them."""
    import gradio as gr

    return [gr.update(value="\n".join(flat[key]) if isinstance(flat.get(key), list) else flat[key])
            if key in flat else gr.skip() for key in keys]


LABELS = {
    "dataset.path": "Dataset folder",
    "model.path": "Base model",
    "output.name": "Run name",
    "sample.prompts": "Sample prompts",
    "sample.every_n_steps": "Validate and sample every N steps",
    "lora.rank": "LoRA rank",
    "lora.alpha": "LoRA alpha",
    "model.revision": "Model revision",
    "model.prediction_type": "Prediction type",
    "sample.steps": "Sample steps",
    "sample.seed": "Sample seed",
    "sample.width": "Sample width",
    "sample.height": "Sample height",
    "sample.sampler": "Sampler",
    "sample.negative_prompt": "Sample negative prompt",
    "sample.guidance_scale": "Sample guidance scale",
    "sample.at_start": "Validate and sample before training",
}


def field_label(key: str) -> str:
    section, name = key.split(".")
    return LABELS.get(key, name.replace("_", " ").capitalize())


def field_component(key: str, value: Any, settings: AppSettings):
    """One widget for one config field; its elem_id is "train-" + the key with dots and underscores as dashes."""
    import gradio as gr

    from core import config as config_mod

    section, name = key.split(".")
    info = config_mod.field_info(section, name)
    hint = info["type"]
    common = dict(label=field_label(key), info=info["help"], value=value,
                  elem_id="train-" + key.replace(".", "-").replace("_", "-"))
    if key == "model.path":
        common["elem_id"] = "train-model"
        models = find_models(settings.models_dir)
        common["value"] = value or (models[0] if models else None)
        return gr.Dropdown(choices=model_choices(settings.models_dir), allow_custom_value=True, **common)
    if key == "dataset.path":
        common["elem_id"] = "train-dataset"
        choices = dataset_choices(settings)
        common["value"] = value or (choices[0] if choices else None)
        return gr.Dropdown(choices=choices, allow_custom_value=True, **common)
    if info["choices"]:
        return gr.Dropdown(choices=info["choices"], **common)
    if hint is bool:
        return gr.Checkbox(**common)
    if typing.get_origin(hint) is list:
        return gr.Textbox(lines=3, placeholder="one per line", **common)
    if hint is int:
        return gr.Number(minimum=info["min"], maximum=info["max"], precision=0, step=info.get("multiple_of") or 1,
                         **common)
    if hint is float:
        return gr.Number(minimum=info["min"], maximum=info["max"], **common)
    return gr.Textbox(**common)


def dataset_choices(settings: AppSettings) -> list[str]:
    return [str(p) for p in sorted(settings.datasets_dir.glob("*")) if p.is_dir() and not p.name.startswith(".")]
