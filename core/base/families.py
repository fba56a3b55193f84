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

import json
from dataclasses import dataclass
from pathlib import Path

import torch


class FamilyError(ValueError):
    """The model is not of a family this app trains; the message says what it is and what to do."""


@dataclass(frozen=True)
class Family:
    name: str  # "sd1", "sd2" or "sdxl": the value of model.family
    label: str  # what the app shows
    pipeline_class: str  # the diffusers pipeline that samples it
    text_encoders: tuple[str, ...]  # subfolders of the model, in order
    tokenizers: tuple[str, ...]
    kohya_text_prefixes: tuple[str, ...]  # per text encoder, as sd-scripts writes them
    ldm_unet_names: bool  # kohya writes the UNet with the original (LDM) module names
    pooled: bool  # the UNet takes pooled text embeddings and size/crop time ids (SDXL)
    native_resolution: int
    denoiser: str = "unet"  # the model's subfolder (and pipeline argument) of the network that trains
    denoiser_class: str = "UNet2DConditionModel"
    vae_class: str = "AutoencoderKL"
    flow: bool = False  # rectified flow (velocity = noise - latents) instead of the DDPM schedule
    # Modules that get a LoRA when lora.target_modules is empty (names or name suffixes, as peft matches them).
    default_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    trainable_text: tuple[int, ...] = (0, 1)  # which text encoders may get a LoRA (by position)
    learning_rate: float = 1e-4  # what the family's presets start from

    def text_lengths(self, denoiser_config) -> tuple[int | None, ...]:
        """Tokens per tokenizer (None: the tokenizer's own window, CLIP's 77)."""
        return (None,) * len(self.tokenizers)

    def lora_targets(self, denoiser, names: list[str]) -> list[str]:
        """What peft's ``target_modules`` gets: the configured names, or the family's defaults."""
        return list(names or self.default_targets)

    def sampling(self, variant: str = "") -> dict:
        """Sample settings the family's presets set (steps, guidance scale); the SD families keep the config's
        defaults (20 steps at 7.5)."""
        return {}

    def variant(self, denoiser_config) -> str:
        """Which model of the family the denoiser's config describes ("" where the family has one)."""
        return ""

    def base_model_version(self, prediction_type: str, variant: str = "") -> str:
        """``ss_base_model_version`` as sd-scripts-aware tools read it."""
        if self.name == "sd1":
            return "sd_v1"
        if self.name == "sd2":
            return "sd_v2_v" if prediction_type == "v_prediction" else "sd_v2"
        return "sdxl_base_v1-0"

    def architecture(self, prediction_type: str, resolution: int, variant: str = "") -> str:
        """``modelspec.architecture`` of a LoRA for this family (Stability's model-spec names)."""
        if self.name == "sd1":
            return "stable-diffusion-v1/lora"
        if self.name == "sd2":
            size = "768-v" if prediction_type == "v_prediction" else "512"
            return f"stable-diffusion-v2-{size}/lora"
        return "stable-diffusion-xl-v1-base/lora"

    def encode(self, encoders, ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompt token ids (one tensor per tokenizer) to the UNet's text conditioning.

        SD 1.x and 2.x: the text encoder's last hidden state (SD 2.x's
        converted OpenCLIP already ends at the penultimate layer). SDXL: the
        penultimate hidden states of both encoders side by side, plus the
        second encoder's pooled, projected embedding.
        """
        if not self.pooled:
            return encoders[0](ids[0].to(_device(encoders[0])))[0], None
        states, pooled = [], None
        for encoder, tokens in zip(encoders, ids, strict=True):
            out = encoder(tokens.to(_device(encoder)), output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled = out[0]  # the last encoder's text_embeds (CLIPTextModelWithProjection)
        return torch.cat(states, dim=-1), pooled

    def predict(self, denoiser, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
        """The denoiser's output for noisy latents at ``timesteps`` (DDPM step numbers), with ``cond`` the
        text conditioning: {"hidden", "pooled", "time_ids"} (the last two for SDXL only)."""
        added = self.added_conditions(cond.get("pooled"), cond.get("time_ids"))
        return denoiser(noisy, timesteps, cond["hidden"], added_cond_kwargs=added, return_dict=False)[0]

    def added_conditions(self, pooled: torch.Tensor | None, time_ids: torch.Tensor | None) -> dict | None:
        """The UNet's ``added_cond_kwargs``: SDXL's pooled text and size/crop ids; None for the others."""
        if not self.pooled:
            return None
        if pooled is None or time_ids is None:
            raise ValueError("SDXL needs pooled text embeddings and time ids for every example")
        return {"text_embeds": pooled, "time_ids": time_ids.to(pooled.dtype)}


def _device(module) -> torch.device:
    return next(module.parameters()).device


FAMILIES = {
    "sd1": Family("sd1", "SD 1.x", "StableDiffusionPipeline", ("text_encoder",), ("tokenizer",), ("lora_te",),
                  ldm_unet_names=False, pooled=False, native_resolution=512),
    "sd2": Family("sd2", "SD 2.x", "StableDiffusionPipeline", ("text_encoder",), ("tokenizer",), ("lora_te",),
                  ldm_unet_names=False, pooled=False, native_resolution=768),
    "sdxl": Family("sdxl", "SDXL", "StableDiffusionXLPipeline", ("text_encoder", "text_encoder_2"),
                   ("tokenizer", "tokenizer_2"), ("lora_te1", "lora_te2"), ldm_unet_names=True, pooled=True,
                   native_resolution=1024),
}


def _register_flow_families() -> None:
    from core.base.flow_families import FLOW_FAMILIES

    FAMILIES.update(FLOW_FAMILIES)


_register_flow_families()


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
    from core.base.flow_families import detect_flow_family

    folder = Path(folder)
    index = _read_json(folder / "model_index.json")
    pipeline = index.get("_class_name", "")
    flow = detect_flow_family(folder, index)
    if flow is not None:
        return flow
    if pipeline.startswith("StableDiffusionXL"):
        return FAMILIES["sdxl"]
    unet = _read_json(folder / "unet" / "config.json")
    if pipeline and not pipeline.startswith("StableDiffusion"):
        raise FamilyError(f"{folder} is a {pipeline} model; this app trains {', '.join(f.label for f in FAMILIES.values())} models")
    if unet.get("addition_embed_type") == "text_time":
        return FAMILIES["sdxl"]
    if unet.get("use_linear_projection") or unet.get("cross_attention_dim") == 1024:
        return FAMILIES["sd2"]
    return FAMILIES["sd1"]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
