"""Small random-weight SD 3.5 and FLUX.1 pipelines, built offline (see ``core.base.tiny``).

Every tokenizer is built in code and every model from an explicit config, with
the real models' structure at toy widths: SD 3.5 Medium's MMDiT-X blocks (the
extra attention in the first block, RMS-normalised q/k) with CLIP-L-, CLIP-G-
and T5-like encoders; FLUX.1-dev's double and single blocks with a guidance
embedding, CLIP-L and T5; both with the 8x, 16-channel VAE and its scaling and
shift factors, and the schedulers the real models ship (SD 3.5: shift 3;
FLUX: dynamic shift). Pictures are 64 px.
"""

from __future__ import annotations

import torch

from core.base.tiny_tokenizers import BOS, EOS, build_qwen_tokenizer, build_t5_tokenizer, build_tokenizer


def _clip(tokenizer, hidden: int, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    vocab = tokenizer.get_vocab()
    config = CLIPTextConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=2,
                            num_hidden_layers=2, projection_dim=hidden, max_position_embeddings=77,
                            vocab_size=len(tokenizer), hidden_act="gelu", bos_token_id=vocab[BOS],
                            eos_token_id=vocab[EOS], pad_token_id=vocab[EOS])
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _t5(tokenizer, width: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=8, d_ff=2 * width, num_layers=2,
                                   num_heads=4, relative_attention_num_buckets=8,
                                   relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
                                   is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1,
                                   decoder_start_token_id=0))


def _vae(scaling_factor: float, shift_factor: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 16, 16),
                         layers_per_block=1, latent_channels=16, norm_num_groups=8, sample_size=64,
                         scaling_factor=scaling_factor, shift_factor=shift_factor, use_quant_conv=False,
                         use_post_quant_conv=False)


def _frozen(pipe):
    """Fresh modules are in training mode (T5's dropout on); a loaded pipeline is in eval mode."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe


def build_sd3(seed: int = 0):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    clip_l, clip_g, t5_width = 32, 48, 128  # T5 at least as wide as both CLIPs side by side, as 4096 >= 768 + 1280
    tokenizers = (build_tokenizer(), build_tokenizer(), build_t5_tokenizer(256))
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=t5_width, caption_projection_dim=32,
        pooled_projection_dim=clip_l + clip_g, pos_embed_max_size=32, qk_norm="rms_norm",
        dual_attention_layers=(0,))  # SD 3.5 Medium (MMDiT-X): a second attention in the first blocks
    return _frozen(StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(1.5305, 0.0609), text_encoder=_clip(tokenizers[0], clip_l, True), tokenizer=tokenizers[0],
        text_encoder_2=_clip(tokenizers[1], clip_g, True), tokenizer_2=tokenizers[1],
        text_encoder_3=_t5(tokenizers[2], t5_width), tokenizer_3=tokenizers[2]))


def build_flux(seed: int = 0, guidance: bool = True):
    """FLUX.1-dev (``guidance``) or schnell (no guidance embedding)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    clip_width, t5_width = 32, 64  # T5 a whole number of 64-value blocks wide: quantisable like the real one
    tokenizer, tokenizer_2 = build_tokenizer(), build_t5_tokenizer(512)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=t5_width, pooled_projection_dim=clip_width,
        guidance_embeds=guidance, axes_dims_rope=(4, 6, 6))  # 16 latent channels packed 2x2 = 64
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return _frozen(FluxPipeline(
        transformer=transformer, scheduler=scheduler, vae=_vae(0.3611, 0.1159),
        text_encoder=_clip(tokenizer, clip_width, False), tokenizer=tokenizer,
        text_encoder_2=_t5(tokenizer_2, t5_width), tokenizer_2=tokenizer_2))


def _qwen3(tokenizer, width: int, layers: int, causal_lm: bool):
    """A Qwen3 text encoder of ``layers`` layers (the pipelines read inner layers' states: Z-Image the
    penultimate, FLUX.2 [klein] layers 9, 18 and 27, so it needs 28)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=width // 2,
                         max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    return (Qwen3ForCausalLM if causal_lm else Qwen3Model)(config)


def build_zimage(seed: int = 0):
    """Z-Image (Turbo's layout): the single-stream DiT with its refiners, a Qwen3 encoder, FLUX.1's VAE."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    tokenizer = build_qwen_tokenizer()
    width = 64  # a whole number of 64-value blocks (quantisable), as 2560 is
    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=width, rope_theta=256.0, t_scale=1000.0,
        axes_dims=[4, 6, 6], axes_lens=[1024, 512, 512])  # axes sum to the head width (32 / 2)
    return _frozen(ZImagePipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False),
        vae=_vae(0.3611, 0.1159), text_encoder=_qwen3(tokenizer, width, 2, causal_lm=False), tokenizer=tokenizer))


def build_flux2_klein(seed: int = 0):
    """FLUX.2 [klein] (base, not distilled): double and single streams, 32-channel VAE with its 2x2 patches and
    batch-norm statistics, a 28-layer Qwen3 encoder whose layers 9, 18 and 27 condition the transformer."""
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )

    tokenizer = build_qwen_tokenizer()
    width = 32
    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=128, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=3 * width, timestep_guidance_channels=256,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)
    vae = AutoencoderKLFlux2(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                             up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 16, 16),
                             layers_per_block=1, latent_channels=32, norm_num_groups=8, sample_size=64,
                             use_quant_conv=True, use_post_quant_conv=True, patch_size=(2, 2))
    with torch.no_grad():  # statistics as a trained VAE has them (the defaults, 0 and 1, would hide mistakes)
        vae.bn.running_mean.uniform_(-0.5, 0.5)
        vae.bn.running_var.uniform_(0.5, 2.0)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return _frozen(Flux2KleinPipeline(transformer=transformer, scheduler=scheduler, vae=vae,
                                      text_encoder=_qwen3(tokenizer, width, 28, causal_lm=True),
                                      tokenizer=tokenizer, is_distilled=False))


BUILDERS = {"sd3": build_sd3, "flux": build_flux, "flux-schnell": lambda seed=0: build_flux(seed, guidance=False),
            "zimage": build_zimage, "flux2": build_flux2_klein}
