"""The flow families with a Qwen3 text encoder: Z-Image and FLUX.2 [klein].

Both read a caption through Qwen3's chat template (one user turn and the
assistant's prompt, 512 tokens) and condition on inner layers of the encoder
instead of a CLIP/T5 output; neither has a pooled embedding, and neither
encoder gets a LoRA (the peers train the transformer only). What differs:

* **Z-Image**: the penultimate layer's states of the caption's own tokens
  (padding dropped, so each caption has its own length: cached unpadded and
  padded per batch); a single-stream DiT with refiner blocks that takes lists
  of latents and caption features, the time as ``1 - sigma`` and returns the
  negative of the velocity; FLUX.1's 16-channel VAE; a fixed shift (3 for
  Turbo, 6 for the base model).
* **FLUX.2 [klein]**: layers 9, 18 and 27 side by side, all 512 rows (the
  padding's states included, as the pipeline feeds them); FLUX.1's double
  and single streams with fused projections; a 32-channel VAE whose latents
  are cut into 2x2 patches (128 channels at 1/16 of the picture) and
  normalised by the batch-norm statistics stored in the VAE; the sampling
  shift from the picture size and the number of steps
  (``compute_empirical_mu``). Distilled checkpoints (4 steps, no guidance)
  say so in model_index.json; the base ones sample with guidance.

Each family's conventions (time, sign, latent normalisation) are checked in
the tests against a step of the family's own pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from core.base.family import Family, _device, config_value, read_json

TEXT_WINDOW = 512  # both pipelines' max_sequence_length


def _qwen_states(encoder, ids: torch.Tensor):
    """The hidden states of every layer (the decoder alone: a causal LM's head is not needed) and the mask."""
    model = getattr(encoder, "model", encoder)
    ids = ids.to(_device(encoder))
    pad = encoder.config.pad_token_id  # set from the tokenizer when the model is loaded (Qwen3's config has none)
    mask = ids != pad if pad is not None else torch.ones_like(ids, dtype=torch.bool)
    return model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states, mask


@dataclass(frozen=True)
class QwenFamily(Family):
    """A caption through Qwen3's chat template (one user turn, then the assistant's prompt), 512 tokens."""

    THINKING = True  # the pipeline's enable_thinking (Z-Image: True, adding nothing; klein: False)

    def text_lengths(self, denoiser_config) -> tuple[int | None, ...]:
        return (TEXT_WINDOW,)

    def prompt_text(self, tokenizer, captions: list[str]) -> list[str]:
        return [tokenizer.apply_chat_template([{"role": "user", "content": caption}], tokenize=False,
                                              add_generation_prompt=True, enable_thinking=self.THINKING)
                for caption in captions]


@dataclass(frozen=True)
class ZImageFamily(QwenFamily):

    def encode(self, encoders, ids, clip_skip: int = 1):
        """(the penultimate layer's states, padded, and each caption's token count): the pipeline drops the
        padding, so only the first ``count`` rows of each caption are its conditioning."""
        states, mask = _qwen_states(encoders[0], ids[0])
        return states[-2], mask.sum(dim=1)

    def predict(self, denoiser, noisy, timesteps, cond):
        hidden, lengths = cond["hidden"], cond.get("lengths")
        features = [hidden[i, : int(lengths[i])] if lengths is not None else hidden[i] for i in range(len(hidden))]
        # Z-Image counts time from the noise (1 - sigma) and predicts latents minus noise: the negative of the
        # velocity the other families predict (its pipeline negates it too).
        out = denoiser([x.unsqueeze(1) for x in noisy.unbind(0)], 1 - timesteps, features, return_dict=False)[0]
        return -torch.stack(out).squeeze(2)

    def pipeline_embeds(self, positive: dict, negative: dict) -> dict:
        return {"prompt_embeds": list(positive["hidden"]), "negative_prompt_embeds": list(negative["hidden"])}

    def variant(self, denoiser_config, folder: Path | None = None) -> str:
        # Turbo (distilled, few steps without guidance) ships with shift 3; the base model with 6.
        shift = read_json(Path(folder) / "scheduler" / "scheduler_config.json").get("shift") if folder else None
        return "base" if shift and shift > 4 else "turbo"

    def sampling(self, variant: str = "") -> dict:
        if variant == "base":
            return {"sample.steps": 28, "sample.guidance_scale": 4.0}
        return {"sample.steps": 9, "sample.guidance_scale": 0.0}

    def base_model_version(self, prediction_type: str, variant: str = "") -> str:
        return "z_image"

    def architecture(self, prediction_type: str, resolution: int, variant: str = "") -> str:
        return "z-image/lora" if variant == "base" else "z-image-turbo/lora"


@dataclass(frozen=True)
class Flux2KleinFamily(QwenFamily):
    OUT_LAYERS = (9, 18, 27)  # the pipeline's text_encoder_out_layers
    THINKING = False

    def encode(self, encoders, ids, clip_skip: int = 1):
        """Layers 9, 18 and 27 side by side, every row (the padding's too: the transformer sees them)."""
        states, _ = _qwen_states(encoders[0], ids[0])
        return torch.cat([states[i] for i in self.OUT_LAYERS], dim=-1), None

    def training_latents(self, vae, mean, std, noise):
        """A draw from the posterior, cut into 2x2 patches (128 channels) and normalised by the VAE's batch-norm
        statistics: the space the pipeline samples in."""
        latents = mean if noise is None else mean + std * noise
        patches = _patchify(latents)
        stats = vae.bn
        scale = torch.sqrt(stats.running_var.float() + vae.config.batch_norm_eps)
        return (patches - stats.running_mean.float()[None, :, None, None]) / scale[None, :, None, None]

    def latent_shape(self, vae_config, width: int, height: int) -> tuple[int, int, int]:
        factor = 2 ** (len(vae_config.block_out_channels) - 1) * 2  # the VAE's 8x, then 2x2 patches
        return (vae_config.latent_channels * 4, height // factor, width // factor)

    def predict(self, denoiser, noisy, timesteps, cond):
        b, c, h, w = noisy.shape
        tokens = noisy.reshape(b, c, h * w).transpose(1, 2)
        image_ids = torch.zeros(h, w, 4, device=noisy.device)  # (time, row, column, text position)
        image_ids[..., 1] = torch.arange(h, device=noisy.device)[:, None]
        image_ids[..., 2] = torch.arange(w, device=noisy.device)[None, :]
        hidden = cond["hidden"]
        text_ids = torch.zeros(hidden.shape[1], 4, device=noisy.device)
        text_ids[:, 3] = torch.arange(hidden.shape[1], device=noisy.device)
        guidance = None
        if denoiser.config.guidance_embeds:
            guidance = torch.full((b,), float(cond.get("guidance", 1.0)), device=noisy.device)
        out = denoiser(hidden_states=tokens, encoder_hidden_states=hidden, timestep=timesteps, guidance=guidance,
                       img_ids=image_ids.reshape(-1, 4), txt_ids=text_ids, return_dict=False)[0]
        return out.transpose(1, 2).reshape(b, c, h, w)

    def dynamic_shift(self, scheduler_config, latent_shape) -> float:
        """exp(mu) of the pipeline's ``compute_empirical_mu`` for the picture's tokens at 50 steps (the base
        model's sampling; the value the pipeline uses at 1024 px is about 7.6)."""
        import math

        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

        return math.exp(compute_empirical_mu(latent_shape[-2] * latent_shape[-1], 50))

    def pipeline_embeds(self, positive: dict, negative: dict) -> dict:
        return {"prompt_embeds": positive["hidden"], "negative_prompt_embeds": negative["hidden"]}

    def variant(self, denoiser_config, folder: Path | None = None) -> str:
        size = "9b" if config_value(denoiser_config, "num_layers", 5) >= 8 else "4b"
        distilled = read_json(Path(folder) / "model_index.json").get("is_distilled", False) if folder else False
        return size if distilled else f"{size}-base"

    def sampling(self, variant: str = "") -> dict:
        if variant and not variant.endswith("-base"):  # distilled: 4 steps, guidance off
            return {"sample.steps": 4, "sample.guidance_scale": 1.0}
        return {"sample.steps": 50, "sample.guidance_scale": 4.0}

    def base_model_version(self, prediction_type: str, variant: str = "") -> str:
        return "flux2_klein"

    def architecture(self, prediction_type: str, resolution: int, variant: str = "") -> str:
        return f"flux-2-klein-{variant or '4b-base'}/lora"


def _patchify(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, 4C, h/2, w/2): each channel's 2x2 neighbours as channels c*4 + dy*2 + dx."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


QWEN_FAMILIES = {
    "zimage": ZImageFamily(
        "zimage", "Z-Image", "ZImagePipeline", ("text_encoder",), ("tokenizer",), (), ldm_unet_names=False,
        pooled=False, native_resolution=1024, denoiser="transformer", denoiser_class="ZImageTransformer2DModel",
        flow=True, trainable_text=(), variable_text=True, block_lists=("layers", "noise_refiner", "context_refiner"),
        default_targets=("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
                         "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")),
    "flux2": Flux2KleinFamily(
        "flux2", "FLUX.2 [klein]", "Flux2KleinPipeline", ("text_encoder",), ("tokenizer",), (),
        ldm_unet_names=False, pooled=False, native_resolution=1024, denoiser="transformer",
        denoiser_class="Flux2Transformer2DModel", vae_class="AutoencoderKLFlux2", flow=True, trainable_text=(),
        negative_prompt=False,
        default_targets=("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
                         "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "ff.linear_in", "ff.linear_out",
                         "ff_context.linear_in", "ff_context.linear_out", "attn.to_qkv_mlp_proj", "attn.to_out")),
}
