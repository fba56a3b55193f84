"""Model families: what differs between SD 1.x, SD 2.x, SDXL, SD 3.5 and FLUX, in one table.

The training loop, the caches, sampling and the export ask the model's
``Family`` instead of testing names: which denoiser it has (a UNet or a
transformer) and which objective trains it (DDPM noise/velocity prediction or
rectified flow), which text encoders there are and how a prompt becomes the
denoiser's conditioning, how the denoiser is called, how kohya names the LoRA
modules, and what the metadata says so that A1111, Forge and ComfyUI
recognise the file. The flow-matching transformer families live in
``core.base.flow_families``; each is a subclass with its own ``encode`` and
``predict``.

A model's family is detected from its own files (``detect_family``) and can
be forced with ``model.family`` in the config.
"""

from __future__ import annotations

from pathlib import Path

from core.base.family import Family, FamilyError, _device, read_json  # noqa: F401 - the family API
from core.base.flow_families import FLOW_FAMILIES
from core.base.qwen_families import QWEN_FAMILIES

FAMILIES = {
    "sd1": Family("sd1", "SD 1.x", "StableDiffusionPipeline", ("text_encoder",), ("tokenizer",), ("lora_te",),
                  ldm_unet_names=False, pooled=False, native_resolution=512),
    "sd2": Family("sd2", "SD 2.x", "StableDiffusionPipeline", ("text_encoder",), ("tokenizer",), ("lora_te",),
                  ldm_unet_names=False, pooled=False, native_resolution=768),
    "sdxl": Family("sdxl", "SDXL", "StableDiffusionXLPipeline", ("text_encoder", "text_encoder_2"),
                   ("tokenizer", "tokenizer_2"), ("lora_te1", "lora_te2"), ldm_unet_names=True, pooled=True,
                   native_resolution=1024),
}


FAMILIES.update(FLOW_FAMILIES)
FAMILIES.update(QWEN_FAMILIES)


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise FamilyError(f"unknown model family {name!r}; choose one of: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def detect_family(folder: str | Path) -> Family:
    """The family of a diffusers model folder, from model_index.json and the UNet config.

    SDXL is its own pipeline class. SD 2.x shares SD 1.x's pipeline but its
    UNet uses linear projections and a 1024-wide (OpenCLIP) cross-attention;
    SD 1.x has neither.
    """
    folder = Path(folder)
    index = read_json(folder / "model_index.json")
    pipeline = index.get("_class_name", "")
    flow = _transformer_family(folder, index)
    if flow is not None:
        return flow
    if pipeline.startswith("StableDiffusionXL"):
        return FAMILIES["sdxl"]
    unet = read_json(folder / "unet" / "config.json")
    if pipeline and not pipeline.startswith("StableDiffusion"):
        labels = ", ".join(f.label for f in FAMILIES.values())
        raise FamilyError(f"{folder} is a {pipeline} model; this app trains {labels} models")
    if unet.get("addition_embed_type") == "text_time":
        return FAMILIES["sdxl"]
    if unet.get("use_linear_projection") or unet.get("cross_attention_dim") == 1024:
        return FAMILIES["sd2"]
    return FAMILIES["sd1"]


def detect_pipeline_family(pipe) -> Family:
    """The family of a loaded diffusers pipeline (SD 2.x told from SD 1.x by its UNet, as ``detect_family``)."""
    name = type(pipe).__name__
    if name == "StableDiffusionPipeline":
        unet = pipe.unet.config
        return FAMILIES["sd2" if unet.get("use_linear_projection") or unet.get("cross_attention_dim") == 1024
                        else "sd1"]
    for family in FAMILIES.values():
        if family.pipeline_class == name:
            return family
    raise FamilyError(f"a {name} pipeline is none of the families this app knows")


def _transformer_family(folder: Path, index: dict) -> Family | None:
    """The flow family of a diffusers folder, from its transformer's class (model_index.json, else the
    transformer's config); None for a folder without a transformer of a known class."""
    declared = index.get("transformer", [None, None])
    cls = declared[1] if isinstance(declared, list) and len(declared) == 2 else None
    cls = cls or read_json(folder / "transformer" / "config.json").get("_class_name")
    return next((f for f in FAMILIES.values() if f.flow and f.denoiser_class == cls), None)
