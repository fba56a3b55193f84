"""The ``Family`` base class: what the engine asks a model family (see ``core.base.families``)."""

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
    # The transformer's lists of blocks, where LoRA targets and the original layout's names live.
    block_lists: tuple[str, ...] = ("transformer_blocks", "single_transformer_blocks")
    variable_text: bool = False  # text states of each caption's own length (Z-Image): cached unpadded
    negative_prompt: bool = True  # the pipeline guides against a negative prompt (FLUX.2: always against "")

    def prompt_text(self, tokenizer, captions: list[str]) -> list[str]:
        """The text the tokenizer reads for each caption (the Qwen3 families wrap it in a chat template)."""
        return captions

    def tokenize(self, tokenizers: list, captions: list[str], lengths: tuple[int, ...]) -> list[torch.Tensor]:
        """Token ids per tokenizer, padded/truncated to each one's window."""
        return [tokenizer(self.prompt_text(tokenizer, captions), padding="max_length", max_length=length,
                          truncation=True, return_tensors="pt").input_ids
                for tokenizer, length in zip(tokenizers, lengths, strict=True)]

    def training_latents(self, vae, mean: torch.Tensor, std: torch.Tensor, noise: torch.Tensor | None):
        """The denoiser's clean latents from the VAE's posterior (a draw with ``noise``, the mean without):
        shifted and scaled by the VAE's factors."""
        latents = mean if noise is None else mean + std * noise
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * vae.config.scaling_factor

    def latent_shape(self, vae_config, width: int, height: int) -> tuple[int, int, int]:
        """(channels, height, width) of one picture's training latents."""
        factor = 2 ** (len(vae_config.block_out_channels) - 1)
        return (vae_config.latent_channels, height // factor, width // factor)

    def pipeline_embeds(self, positive: dict, negative: dict) -> dict:
        """The pipeline's arguments for an encoded prompt and negative prompt (batches of one)."""
        return {"prompt_embeds": positive["hidden"], "pooled_prompt_embeds": positive["pooled"],
                "negative_prompt_embeds": negative["hidden"], "negative_pooled_prompt_embeds": negative["pooled"]}

    def dynamic_shift(self, scheduler_config, latent_shape) -> float:
        """The shift of sampled noise levels for a scheduler with dynamic shifting (FLUX.1): exp(mu), mu
        linear in the image tokens between base_shift at base_image_seq_len and max_shift at max_image_seq_len,
        as its pipeline computes it."""
        import math

        sc = scheduler_config
        tokens = (latent_shape[-2] // 2) * (latent_shape[-1] // 2)
        lo, hi = sc.get("base_image_seq_len", 256), sc.get("max_image_seq_len", 4096)
        base, top = sc.get("base_shift", 0.5), sc.get("max_shift", 1.15)
        return math.exp(base + (top - base) * (tokens - lo) / (hi - lo))

    def text_lengths(self, denoiser_config) -> tuple[int | None, ...]:
        """Tokens per tokenizer (None: the tokenizer's own window, CLIP's 77)."""
        return (None,) * len(self.tokenizers)

    def lora_targets(self, denoiser, names: list[str]) -> list[str]:
        """What peft's ``target_modules`` gets: the configured names, or the family's defaults (for the flow
        transformers, the full paths of the matching layers inside their blocks)."""
        if self.flow:
            return block_targets(denoiser, names or self.default_targets, self.block_lists)
        return list(names or self.default_targets)

    def sampling(self, variant: str = "") -> dict:
        """Sample settings the family's presets set (steps, guidance scale); the SD families keep the config's
        defaults (20 steps at 7.5)."""
        return {}

    def variant(self, denoiser_config, folder: Path | None = None) -> str:
        """Which model of the family the denoiser's config (and, where it says more, the model's folder)
        describe ("" where the family has one)."""
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

    def encode(self, encoders, ids: list[torch.Tensor], clip_skip: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompt token ids (one tensor per tokenizer) to the UNet's text conditioning.

        SD 1.x and 2.x: the text encoder's last hidden state (SD 2.x's
        converted OpenCLIP already ends at the penultimate layer), or with
        ``clip_skip`` N > 1 the state N layers from the end through CLIP's
        final norm (as A1111 and sd-scripts compute it). SDXL: the penultimate
        hidden states of both encoders side by side, plus the second encoder's
        pooled, projected embedding.
        """
        if not self.pooled:
            encoder = encoders[0]
            if clip_skip <= 1:
                return encoder(ids[0].to(_device(encoder)))[0], None
            out = encoder(ids[0].to(_device(encoder)), output_hidden_states=True)
            norm = encoder.text_model.final_layer_norm if hasattr(encoder, "text_model") else encoder.final_layer_norm
            return norm(out.hidden_states[-clip_skip]), None
        states, pooled = [], None
        for encoder, tokens in zip(encoders, ids, strict=True):
            out = encoder(tokens.to(_device(encoder)), output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled = out[0]  # the last encoder's text_embeds (CLIPTextModelWithProjection)
        return torch.cat(states, dim=-1), pooled

    def missing_parts(self, folder: Path) -> list[str]:
        """The subfolders this family's diffusers folder needs that ``folder`` lacks."""
        needed = (self.denoiser, "vae", "scheduler", *self.text_encoders, *self.tokenizers)
        return [name for name in needed if not (Path(folder) / name).is_dir()]

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


def config_value(config, key: str, default=None):
    """``key`` of a config that is a dict (a reference architecture) or a diffusers FrozenDict/object."""
    if isinstance(config, dict):
        return config.get(key, default)
    return getattr(config, key, default)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def block_targets(denoiser, names, block_lists=("transformer_blocks", "single_transformer_blocks")) -> list[str]:
    """Full paths of the linear layers inside the transformer's blocks (``block_lists``) whose names end with
    one of ``names`` (``*`` matches a block index), so that the top-level ``proj_out`` of a FLUX model (its
    final layer) is not taken for a single block's ``proj_out``."""
    import fnmatch

    found = []
    for path, module in denoiser.named_modules():
        if not isinstance(module, torch.nn.Linear) or path.split(".")[0] not in block_lists or "lora_" in path:
            continue
        if any(path == n or path.endswith("." + n) or fnmatch.fnmatch(path, n) for n in names):
            found.append(path)
    return found
