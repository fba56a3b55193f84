"""The flow-matching transformer families: Stable Diffusion 3.5 and FLUX.1.

They differ from the SD families in everything the engine asks a ``Family``:
the denoiser is a transformer (``SD3Transformer2DModel``,
``FluxTransformer2DModel``) trained on the rectified-flow target (velocity =
noise - latents) instead of a UNet on the DDPM schedule; a T5 encoder joins
the CLIP ones (its long prompts are not cut at 77 tokens, and only the CLIP
encoders ever get a LoRA, as in the other trainers); the VAE has 16 latent
channels with a shift factor; FLUX packs 2x2 latent patches into a token
sequence and takes a guidance value (FLUX.1-dev) and position ids.

Each family reads its variant from the transformer's own config: FLUX.1-dev
has a guidance embedding and schnell has none; SD 3.5 Large has 38 blocks,
Medium 24 with extra attention layers (MMDiT-X), SD 3 Medium 24 without.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from core.base.family import Family, _device, config_value


@dataclass(frozen=True)
class SD3Family(Family):
    """Stable Diffusion 3 / 3.5: CLIP-L and OpenCLIP-bigG (both with projection) and T5-XXL."""

    def text_lengths(self, denoiser_config) -> tuple[int | None, ...]:
        return (None, None, 256)  # what StableDiffusion3Pipeline uses (max_sequence_length)

    def sampling(self, variant: str = "") -> dict:
        # Stability's cards: Large 28 steps at guidance 3.5-4.5, Medium 40 steps at 4.5
        return {"sample.steps": 40 if variant == "3.5-medium" else 28, "sample.guidance_scale": 4.5}

    def variant(self, denoiser_config, folder: Path | None = None) -> str:
        layers = config_value(denoiser_config, "num_layers", 0)
        if layers >= 38:
            return "large"
        return "3.5-medium" if config_value(denoiser_config, "dual_attention_layers", ()) else "medium"

    def base_model_version(self, prediction_type: str, variant: str = "") -> str:
        # sd-scripts writes its MMDiT's model type: "medium" (SD 3), "5-medium", "5-large".
        return {"large": "5-large", "3.5-medium": "5-medium"}.get(variant, "medium")

    def architecture(self, prediction_type: str, resolution: int, variant: str = "") -> str:
        return f"stable-diffusion-3-{self.base_model_version(prediction_type, variant)}/lora"

    def encode(self, encoders, ids, clip_skip: int = 1):
        """The CLIP encoders' penultimate states side by side, zero-padded to T5's width, then T5's states
        after them in the sequence; pooled: both CLIP projections side by side (as the SD3 pipeline does)."""
        clip_states, pooled = [], []
        for encoder, tokens in zip(encoders[:2], ids[:2], strict=True):
            out = encoder(tokens.to(_device(encoder)), output_hidden_states=True)
            clip_states.append(out.hidden_states[-2])
            pooled.append(out[0])
        t5 = encoders[2](ids[2].to(_device(encoders[2])))[0]
        clip = torch.cat(clip_states, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5.to(clip.dtype)], dim=-2), torch.cat(pooled, dim=-1)

    def predict(self, denoiser, noisy, timesteps, cond):
        # SD3's transformer takes the timestep on the 0-1000 scale of its scheduler.
        return denoiser(hidden_states=noisy, timestep=timesteps * 1000, encoder_hidden_states=cond["hidden"],
                        pooled_projections=cond["pooled"], return_dict=False)[0]


@dataclass(frozen=True)
class FluxFamily(Family):
    """FLUX.1 dev/schnell: CLIP-L (pooled only) and T5-XXL; latents packed 2x2 into tokens."""

    def text_lengths(self, denoiser_config) -> tuple[int | None, ...]:
        # FluxPipeline's max_sequence_length: 512 for dev; schnell was distilled with 256.
        return (None, 512 if config_value(denoiser_config, "guidance_embeds", False) else 256)

    def sampling(self, variant: str = "") -> dict:
        # dev: 28 steps with its distilled guidance 3.5; schnell: 4 steps, no guidance
        if variant == "schnell":
            return {"sample.steps": 4, "sample.guidance_scale": 0.0}
        return {"sample.steps": 28, "sample.guidance_scale": 3.5}

    def pipeline_embeds(self, positive: dict, negative: dict) -> dict:
        # guidance-distilled: no negative prompt
        return {"prompt_embeds": positive["hidden"], "pooled_prompt_embeds": positive["pooled"]}

    def variant(self, denoiser_config, folder: Path | None = None) -> str:
        return "dev" if config_value(denoiser_config, "guidance_embeds", False) else "schnell"

    def base_model_version(self, prediction_type: str, variant: str = "") -> str:
        return "flux1"

    def architecture(self, prediction_type: str, resolution: int, variant: str = "") -> str:
        return f"flux-1-{variant or 'dev'}/lora"

    def encode(self, encoders, ids, clip_skip: int = 1):
        clip, t5 = encoders
        pooled = clip(ids[0].to(_device(clip))).pooler_output
        hidden = t5(ids[1].to(_device(t5)))[0]
        return hidden, pooled.to(hidden.dtype)

    def predict(self, denoiser, noisy, timesteps, cond):
        b, c, h, w = noisy.shape
        if h % 2 or w % 2:
            raise ValueError(f"FLUX packs latents in 2x2 patches; a {h}x{w} latent cannot be packed (pictures "
                             f"must be multiples of 16 pixels)")
        tokens = noisy.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)
        image_ids = torch.zeros(h // 2, w // 2, 3, device=noisy.device)
        image_ids[..., 1] = torch.arange(h // 2, device=noisy.device)[:, None]
        image_ids[..., 2] = torch.arange(w // 2, device=noisy.device)[None, :]
        hidden = cond["hidden"]
        text_ids = torch.zeros(hidden.shape[1], 3, device=noisy.device)
        guidance = None
        if denoiser.config.guidance_embeds:
            guidance = torch.full((b,), float(cond.get("guidance", 1.0)), device=noisy.device)
        out = denoiser(hidden_states=tokens, timestep=timesteps, guidance=guidance,
                       pooled_projections=cond["pooled"], encoder_hidden_states=hidden, txt_ids=text_ids,
                       img_ids=image_ids.reshape(-1, 3), return_dict=False)[0]
        return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


# The layers the peers train by default: every projection of both attention streams for SD 3.5 (the diffusers
# example's set, plus SD 3.5 Medium's second attention), and for FLUX every linear layer of the double and
# single blocks except the modulations (sd-scripts' default): img_attn.qkv/proj, txt_attn.qkv/proj, img_mlp,
# txt_mlp, and linear1 (q, k, v and the MLP input) and linear2 in the single blocks.
_SD3_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                "attn.add_v_proj", "attn.to_add_out")
_FLUX_TARGETS = (*_SD3_TARGETS, "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
                 "proj_mlp", "single_transformer_blocks.*.proj_out")


FLOW_FAMILIES = {
    "sd3": SD3Family("sd3", "SD 3.5", "StableDiffusion3Pipeline", ("text_encoder", "text_encoder_2", "text_encoder_3"),
               ("tokenizer", "tokenizer_2", "tokenizer_3"), ("lora_te1", "lora_te2"), ldm_unet_names=False,
               pooled=True, native_resolution=1024, denoiser="transformer", denoiser_class="SD3Transformer2DModel",
               flow=True, default_targets=(*_SD3_TARGETS, "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"),
               trainable_text=(0, 1), learning_rate=1e-4),
    "flux": FluxFamily("flux", "FLUX.1", "FluxPipeline", ("text_encoder", "text_encoder_2"),
                 ("tokenizer", "tokenizer_2"), ("lora_te1",), ldm_unet_names=False, pooled=True,
                 native_resolution=1024, denoiser="transformer", denoiser_class="FluxTransformer2DModel", flow=True,
                 default_targets=_FLUX_TARGETS, trainable_text=(0,), learning_rate=1e-4),
}
