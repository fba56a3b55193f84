"""Which settings the Train tab shows, and where: the basic ones first, the rest under Advanced, one fold per
topic. Built from the config's own field metadata (``core.config_fields``)."""

from __future__ import annotations

import dataclasses
from typing import Any

from core import config as config_mod
from core.config import TrainConfig
from ui.settings import AppSettings

HIDDEN = {"output.dir"}  # the app keeps runs in its own outputs folder



def all_fields() -> list[str]:
    cfg = TrainConfig()
    keys = [f"{s}.{f.name}" for s in config_mod.SECTIONS for f in dataclasses.fields(getattr(cfg, s))]
    return [k for k in keys if k not in HIDDEN]


def field_info(key: str) -> dict:
    section, name = key.split(".")
    return config_mod.field_info(section, name)


def basic_fields() -> list[str]:
    """Shown first: the fields the config marks ``group="basic"``, in its order."""
    return [k for k in all_fields() if field_info(k)["group"] == "basic"]


def advanced_fields() -> list[str]:
    """Under the Advanced accordion: everything else."""
    return [k for k in all_fields() if field_info(k)["group"] != "basic"]


# The Advanced settings by topic, in this order: a key's own entry, else its prefix's, else its section's.
ADVANCED_GROUPS = ("Model", "Data", "LoRA", "Optimizer", "Noise and loss", "Samples and validation", "Saving",
                   "Memory")
_TOPIC = {
    "model.quantize": "Memory", "model.group_offload": "Memory",
    "dataset.cache_latents": "Memory", "dataset.cache_while_training": "Memory",
    "dataset.cache_dir": "Memory", "train.mixed_precision": "Memory",
    "train.gradient_checkpointing": "Memory",
    "model.clip_skip": "Model", "model.prediction_type": "Model", "model.family": "Model", "model.revision": "Model",
    "dataset.validation_split": "Samples and validation", "dataset.validation_path": "Samples and validation",
    "train.noise_offset": "Noise and loss", "train.min_snr_gamma": "Noise and loss",
    "train.zero_terminal_snr": "Noise and loss", "train.prior_loss_weight": "Noise and loss",
    "train.guidance_scale": "Noise and loss", "train.flow_shift": "Noise and loss",
    "train.seed": "Data", "train.max_train_epochs": "Optimizer", "train.batch_size": "Optimizer",
    "train.gradient_accumulation_steps": "Optimizer",
}
_TOPIC_PREFIX = (("train.min_timestep", "Noise and loss"), ("train.max_timestep", "Noise and loss"),
                 ("train.timestep", "Noise and loss"), ("train.loss", "Noise and loss"),
                 ("train.huber", "Noise and loss"), ("train.debiased", "Noise and loss"),
                 ("train.multires", "Noise and loss"), ("train.ip_noise", "Noise and loss"),
                 ("train.logit", "Noise and loss"), ("train.mode_scale", "Noise and loss"))
_TOPIC_SECTION = {"model": "Memory", "dataset": "Data", "lora": "LoRA", "train": "Optimizer",
                  "sample": "Samples and validation", "output": "Saving"}


def topic_of(key: str) -> str:
    if key in _TOPIC:
        return _TOPIC[key]
    prefixed = next((topic for prefix, topic in _TOPIC_PREFIX if key.startswith(prefix)), None)
    return prefixed or _TOPIC_SECTION[key.split(".")[0]]


def advanced_groups() -> list[tuple[str, list[str]]]:
    """(topic, its Advanced fields) in ADVANCED_GROUPS order, empty topics left out."""
    fields = advanced_fields()
    return [(topic, [k for k in fields if topic_of(k) == topic]) for topic in ADVANCED_GROUPS
            if any(topic_of(k) == topic for k in fields)]


def group_id(topic: str) -> str:
    return "train-advanced-" + topic.lower().replace(" and ", "-").replace(" ", "-")


def advanced_widgets(defaults: dict, settings: AppSettings) -> dict[str, Any]:
    """The Advanced fold: one fold per topic (advanced_groups), each with its fields' widgets."""
    import gradio as gr

    from ui.widgets import field_component

    components = {}
    with gr.Accordion("Advanced", open=False, elem_id="train-advanced"):
        for topic, keys in advanced_groups():
            with gr.Accordion(topic, open=False, elem_id=group_id(topic)):
                for key in keys:
                    components[key] = field_component(key, defaults[key], settings)
    return components
