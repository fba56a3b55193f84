"""Gradio widgets generated from the config's field metadata (label, help, range, choices)."""

from __future__ import annotations

import typing
from typing import Any

from ui.settings import AppSettings, find_models


def field_component(key: str, value: Any, settings: AppSettings):
    """One widget for one config field; its elem_id is "train-" + the key with dots and underscores as dashes."""
    import gradio as gr

    from core import config as config_mod

    section, name = key.split(".")
    info = config_mod.field_info(section, name)
    hint = info["type"]
    common = dict(label=name.replace("_", " ").capitalize(), info=info["help"], value=value,
                  elem_id="train-" + key.replace(".", "-").replace("_", "-"))
    if key == "model.path":
        common["elem_id"] = "train-model"
        return gr.Dropdown(choices=find_models(settings.models_dir), allow_custom_value=True, **common)
    if key == "dataset.path":
        common["elem_id"] = "train-dataset"
        choices = [str(p) for p in sorted(settings.datasets_dir.glob("*")) if p.is_dir()]
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
