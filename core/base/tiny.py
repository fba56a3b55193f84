"""Build small pipelines (SD 1.x, SD 2.x, SDXL, SD 3.5, FLUX.1) with random weights, offline.

``python -m core tiny-model DIR [--family sd15|sd2|sdxl|sd3|flux|flux-schnell]`` writes one (the flow
families are built in ``core.base.tiny_flow``). Tests, the demo and benchmarks
use it because nothing can be downloaded on CI machines. The weights are
random, so the pictures are noise, but every code path (loading, LoRA,
training, sampling, export) is the real one.

Two shapes exist:

* ``tiny`` -- a few hundred thousand parameters, 64 px, trains at several
  steps per second on a CPU. One per family: ``sd15`` (the default), ``sd2``
  (SD 2.x's linear projections, OpenCLIP-style GELU text encoder and
  v-prediction) and ``sdxl`` (two text encoders, pooled text and size/crop
  conditioning).
* ``sd15`` -- the exact layer shapes of Stable Diffusion 1.5 (859M-parameter
  UNet, CLIP ViT-L text encoder, the 8x VAE), used to measure speed and memory
  of a real-sized run without downloading 4 GB.
"""

from __future__ import annotations

from pathlib import Path

from core.base.tiny_tokenizers import BOS, EOS, build_tokenizer  # noqa: F401 - tests and demos build it from here


def _configs(shape: str, tokenizer) -> dict:
    vocab = tokenizer.get_vocab()
    special = {
        "bos_token_id": vocab[BOS],
        "eos_token_id": vocab[EOS],
        "pad_token_id": vocab[EOS],
    }
    if shape == "tiny":
        return {
            "unet": dict(
                block_out_channels=(32, 64),
                layers_per_block=2,
                sample_size=32,
                in_channels=4,
                out_channels=4,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                cross_attention_dim=32,
                attention_head_dim=8,
                norm_num_groups=32,
            ),
            "vae": dict(
                block_out_channels=(32, 64),
                in_channels=3,
                out_channels=3,
                down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
                latent_channels=4,
                sample_size=64,
            ),
            "text": dict(
                hidden_size=32,
                intermediate_size=37,
                num_attention_heads=4,
                num_hidden_layers=5,
                projection_dim=32,
                max_position_embeddings=77,
                vocab_size=len(vocab) + 8,
                **special,
            ),
        }
    if shape == "sd15":
        # Layer shapes of runwayml/stable-diffusion-v1-5 (diffusers defaults
        # for UNet2DConditionModel are the SD-1.x UNet).
        return {
            "unet": dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8),
            "vae": dict(
                block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2,
                latent_channels=4,
                sample_size=512,
            ),
            "text": dict(
                hidden_size=768,
                intermediate_size=3072,
                num_attention_heads=12,
                num_hidden_layers=12,
                projection_dim=768,
                max_position_embeddings=77,
                hidden_act="quick_gelu",
                vocab_size=49408,
                **special,
            ),
        }
    raise ValueError(f"unknown model shape {shape!r}; use 'tiny' or 'sd15'")


TINY_FAMILIES = ("sd15", "sd2", "sdxl", "sd3", "flux", "flux-schnell", "flux2", "zimage")


def build_pipeline(shape: str = "tiny", seed: int = 0, family: str = "sd15"):
    """Return a pipeline with random weights: ``StableDiffusionPipeline``, or the XL, SD3 or FLUX one."""
    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown family {family!r}; use one of: {', '.join(TINY_FAMILIES)}")
    if family != "sd15" and shape != "tiny":
        raise ValueError(f"shape {shape!r} exists only for sd15; use the tiny shape for {family}")
    if family == "sdxl":
        return _build_sdxl(seed)
    if family in ("sd3", "flux", "flux-schnell", "flux2", "zimage"):
        from core.base.tiny_flow import BUILDERS

        return BUILDERS[family](seed)
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tokenizer()
    configs = _configs(shape, tokenizer)
    if family == "sd2":
        # SD 2.x: linear projections in the transformers, per-block head dims, GELU text encoder.
        configs["unet"].update(use_linear_projection=True, attention_head_dim=(4, 8))
        configs["text"].update(hidden_act="gelu")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**configs["unet"])
    vae = AutoencoderKL(**configs["vae"])
    text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text"]))
    scheduler = _sd2_scheduler() if family == "sd2" else PNDMScheduler(
        # the scheduler Stable Diffusion 1.5 ships with
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
    )
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _sd2_scheduler():
    """What SD 2.x (768-v) ships with: DDIM, v-prediction."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction")


def _build_sdxl(seed: int):
    """A tiny SDXL: CLIP-L-like and CLIP-G-like text encoders (the second with projection), text_time UNet."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = build_tokenizer()
    configs = _configs("tiny", tokenizer)
    text = configs["text"]
    # The second encoder is wider than the first, as bigG (1280) is wider than CLIP-L (768): single-file
    # loaders tell the two apart by width.
    text_2 = {**text, "hidden_size": 64, "intermediate_size": 74, "projection_dim": 64, "hidden_act": "gelu"}
    unet_config = dict(configs["unet"])
    time_dim = 8
    unet_config.update(
        cross_attention_dim=text["hidden_size"] + text_2["hidden_size"],  # both encoders' states side by side
        use_linear_projection=True,
        attention_head_dim=(4, 8),
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        # six size/crop numbers, each embedded to time_dim, plus the pooled text
        projection_class_embeddings_input_dim=6 * time_dim + text_2["projection_dim"],
    )
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config)
    vae = AutoencoderKL(**configs["vae"], scaling_factor=0.13025)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_2))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=build_tokenizer(), unet=unet,
                                     scheduler=scheduler, add_watermarker=False)


def write_tiny_model(directory: str | Path, shape: str = "tiny", seed: int = 0, family: str = "sd15") -> Path:
    """Write a random-weight pipeline as a diffusers folder and return its path.

    The folder is written to a temporary sibling and renamed into place, so an
    interrupted call never leaves a half-written model behind.
    """
    from core.fsutil import new_folder

    with new_folder(directory) as tmp:  # refuses a non-empty folder before the (slow) build
        build_pipeline(shape, seed, family).save_pretrained(tmp, safe_serialization=True)
    return Path(directory)
