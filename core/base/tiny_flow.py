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

from core.base.tiny import BOS, EOS, _WORDS, build_tokenizer


def build_t5_tokenizer(model_max_length: int = 512):
    """A T5 (unigram) tokenizer in memory: <pad> 0, </s> 1, <unk> 2, a few whole words, then characters.

    ``extra_ids=0`` leaves out T5's 100 sentinel tokens; size the encoder's vocabulary with ``len()``.
    """
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + word, -3.0 - 0.01 * i) for i, word in enumerate(_WORDS)]
    pieces += [(c, -10.0) for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'\"-:;()"]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


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


BUILDERS = {"sd3": build_sd3, "flux": build_flux, "flux-schnell": lambda seed=0: build_flux(seed, guidance=False)}
