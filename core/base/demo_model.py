"""A small SD-1.x model that really draws: trained here, in about ten CPU minutes, on ``core.base.demo_pictures``.

``python -m core demo-model DIR [--steps N] [--seed S]`` builds it; the result of the default build ships
as ``examples/demo-model`` (a diffusers folder of 2.6 MB), so the demo and CI never rebuild it.

The build, in order (``build_pipeline``):

1. draw ``pictures`` captioned pictures (coloured shapes at 64 px, see ``demo_pictures``);
2. train the VAE, on the same shapes in any colour, as an autoencoder whose first three latent channels are
   the picture's colours at a quarter of its size (4 latent channels, 16x16 latents), its decoder also
   taught to clip colours that guidance pushes out of range; then pin its posterior's spread to almost
   nothing, so training's latent draws are the mean;
3. encode every picture once and scale the latents to unit spread (``scaling_factor``);
4. teach the small CLIP text encoder (it reads the project's in-code byte-level tokenizer, so "red" is the
   characters r, e, d) to carry what the caption says at its end and padding positions;
5. train the UNet (the tiny model's layout with one ResNet per block, 16x16 samples) with the usual
   epsilon-prediction loss against diffusers' ``DDPMScheduler`` (Stable Diffusion's schedule), the text
   encoder along with it at a lower rate, one caption in ten dropped so classifier-free guidance works; the
   noisy steps are drawn more often than the clean ones, and the UNet's weights are averaged (EMA);
6. save UNet and VAE in fp16 (diffusers casts them to fp32 when they load without a dtype) and the text
   encoder in fp32 (transformers would keep it in fp16; it is tiny), with a DDIM sampler.

It runs on one thread; the same seed and step count give the same model with the same libraries.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from core.base.demo_pictures import BACKGROUNDS, COLOURS, SHAPES, TEXTURES

DEFAULT_STEPS = 2000  # UNet steps of the shipped model
ATTRIBUTES = (list(COLOURS), list(SHAPES), list(BACKGROUNDS), list(TEXTURES))  # what a caption says


@dataclass
class BuildSettings:
    """How much training the build does; ``for_steps`` derives the rest from the UNet's step count."""

    steps: int = DEFAULT_STEPS  # UNet (+ text encoder) steps
    vae_steps: int = 400
    text_steps: int = 200  # the text encoder's own steps before the UNet's
    pictures: int = 3000
    batch_size: int = 16
    learning_rate: float = 1e-3
    text_learning_rate: float = 3e-4  # the text encoder's while the UNet trains
    vae_learning_rate: float = 2e-3
    vae_latent_noise: float = 0.15  # std of the noise on the latents the decoder learns from (colours: -1..1)
    vae_colour_shift: float = 1.5  # std of the colour offsets the decoder learns to clip (``_colour_shift``)
    caption_dropout: float = 0.1
    noise_offset: float = 0.1
    timestep_odds_cap: float = 10.0  # the noisiest levels are drawn up to this many times as often as t = 0
    ema_decay: float = 0.995
    seed: int = 0

    @classmethod
    def for_steps(cls, steps: int = DEFAULT_STEPS, seed: int = 0) -> BuildSettings:
        """Settings of a build with ``steps`` UNet steps: a short build (a test's) trains the VAE and draws
        pictures in proportion, so it takes seconds."""
        if steps < 1:
            raise ValueError(f"--steps must be at least 1 (got {steps})")
        scale = min(1.0, steps / DEFAULT_STEPS)
        return cls(steps=steps, vae_steps=max(1, round(400 * scale)), text_steps=max(1, round(200 * scale)),
                    pictures=max(32, round(3000 * scale)), seed=seed)


def model_configs(tokenizer) -> dict:
    """Configs of the three networks: the tiny model's UNet with one ResNet per block (a third faster to train,
    and it learned the colours better in the same time), its text encoder, and a 3-level VAE (16x16 latents)."""
    from core.base.tiny_tokenizers import BOS, EOS

    vocab = tokenizer.get_vocab()
    return {
        "unet": dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4,
                     out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                     attention_head_dim=8, norm_num_groups=32),
        "vae": dict(block_out_channels=(8, 16, 32), layers_per_block=1, norm_num_groups=4, in_channels=3,
                    out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                    up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, sample_size=64),
        "text": dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5,
                     projection_dim=32, max_position_embeddings=77, vocab_size=len(vocab) + 8,
                     bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[EOS]),
    }


def noise_schedule() -> dict:
    """Stable Diffusion 1.x's training schedule (so every sampler the app offers fits it)."""
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                prediction_type="epsilon", steps_offset=1)


def to_pixels(pictures) -> object:
    """PIL pictures to a float tensor (N, 3, H, W) in [-1, 1]."""
    import numpy as np
    import torch

    array = np.stack([np.asarray(p.convert("RGB"), dtype=np.float32) for p in pictures])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0


def train_vae(vae, pixels, settings: BuildSettings, log: Callable[[str], None]) -> None:
    """Train the VAE as an autoencoder whose first three latent channels are the picture's colours at a quarter
    of its size (pulled towards the 4x4-average-pooled RGB); the fourth is free for edges and texture. The
    decoder also learns to clip colours pushed out of range (``_colour_shift``).

    Left alone, such a small VAE packs colour into tiny differences along one direction (red, yellow and
    magenta squares got nearly the same latent), which the UNet cannot learn to draw; tied to RGB, colours
    are far apart in the latent space and a magenta LoRA has a clear direction to learn. The decoder reads
    the posterior mean plus some noise, so it forgives the UNet's small errors."""
    import torch
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(settings.seed + 1)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.vae_learning_rate, weight_decay=0.0)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    vae.train()
    for step in range(settings.vae_steps):
        batch = pixels[torch.randint(len(pixels), (settings.batch_size,), generator=generator)]
        mean = vae.encode(batch).latent_dist.mean
        noisy = mean + settings.vae_latent_noise * torch.randn(mean.shape, generator=generator)
        shift = _colour_shift(len(batch), settings.vae_colour_shift, generator)
        noisy = torch.cat([noisy[:, :3] + F.interpolate(shift, size=noisy.shape[-2:]), noisy[:, 3:]], dim=1)
        target = (batch + F.interpolate(shift, size=batch.shape[-2:])).clamp(-1.0, 1.0)
        anchor = F.mse_loss(mean[:, :3], F.avg_pool2d(batch, factor))
        loss = F.mse_loss(vae.decode(noisy).sample, target) + anchor + 1e-3 * mean[:, 3:].pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == settings.vae_steps - 1:
            log(f"vae step {step + 1}/{settings.vae_steps} loss {loss.item():.4f}")
    vae.eval()


def _colour_shift(count: int, spread: float, generator):
    """Colour shifts for the decoder's lesson in overshoot: for half the pictures, a random offset of the three
    colour channels per quarter of the picture (a 4x4 grid, std ``spread``); zero for the others.

    Classifier-free guidance at 7.5 pushes the UNet's colours past any colour it was trained on (a LoRA's new
    colour most of all). Shown latents moved by an offset with the picture moved by the same offset and clipped
    to the colour range, the decoder draws such latents as the most saturated colour in that direction, where an
    untaught one draws dark or unrelated colours."""
    import torch

    shift = torch.randn((count, 3, 4, 4), generator=generator) * spread
    return shift * (torch.rand((count, 1, 1, 1), generator=generator) < 0.5)


def pin_posterior(vae, log_variance: float = -12.0) -> None:
    """Make the posterior's spread exp(-6): training's latent draws (mean + std * noise) are then the mean.

    ``quant_conv`` is a 1x1 convolution whose second half of output channels is the log-variance; its weights
    go to 0 and its bias to ``log_variance``, which leaves the mean untouched."""
    import torch

    channels = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[channels:] = 0.0
        vae.quant_conv.bias[channels:] = log_variance


def encode(vae, pixels, batch_size: int = 64):
    """Posterior means of ``pixels`` (unscaled), in batches."""
    import torch

    with torch.no_grad():
        return torch.cat([vae.encode(pixels[i:i + batch_size]).latent_dist.mean
                          for i in range(0, len(pixels), batch_size)])


def caption_labels(caption: str) -> list[int]:
    """The caption's colour, shape, background and texture as indices into ``ATTRIBUTES`` (-1: not said)."""
    words = caption.replace(",", " ").split()
    background = words[words.index("background") - 1] if "background" in words else None
    picked = [next((w for w in words if w in COLOURS), None), next((w for w in words if w in SHAPES), None),
              background, next((w for w in words if w in TEXTURES), "plain")]
    return [names.index(word) if word in names else -1 for names, word in zip(ATTRIBUTES, picked, strict=True)]


def train_text_encoder(text_encoder, tokenizer, captions: list[str], settings: BuildSettings,
                       log: Callable[[str], None]) -> None:
    """Teach the text encoder to say what a caption says at its end-of-text and padding positions.

    A throwaway linear head reads colour, shape, background and texture from each of those positions' states
    (what CLIP's end token carries for the pooled embedding). From a random start the UNet's cross-attention
    hardly finds the three character tokens of "red" among 77; with every padding state carrying the colour
    it conditions on the text within a few hundred steps."""
    import torch

    from core.base.text import tokenize

    generator = torch.Generator().manual_seed(settings.seed + 3)
    ids = tokenize(tokenizer, captions)
    labels = torch.tensor([caption_labels(c) for c in captions])
    end = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    sizes = [len(names) for names in ATTRIBUTES]
    head = torch.nn.Linear(text_encoder.config.hidden_size, sum(sizes))
    optimizer = torch.optim.AdamW([*text_encoder.parameters(), *head.parameters()], lr=3e-3, weight_decay=0.0)
    text_encoder.train()
    for step in range(settings.text_steps):
        pick = torch.randint(len(ids), (64,), generator=generator)
        at_end = ids[pick] == end  # the end token and the padding after it
        states = head(text_encoder(ids[pick])[0][at_end])
        targets = labels[pick].unsqueeze(1).expand(-1, ids.shape[1], -1)[at_end]
        loss = sum(torch.nn.functional.cross_entropy(logits, targets[:, k], ignore_index=-1)
                   for k, logits in enumerate(states.split(sizes, dim=1)))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == settings.text_steps - 1:
            log(f"text encoder step {step + 1}/{settings.text_steps} loss {loss.item():.4f}")


def train_denoiser(unet, text_encoder, tokenizer, latents, captions: list[str], settings: BuildSettings,
                   log: Callable[[str], None]):
    """Train UNet and text encoder on (scaled latents, captions) with the epsilon DDPM loss; return the UNet's
    exponential moving average (what is saved).

    The noise has a small offset per picture and channel (``noise_offset``), so the model relies less on the
    faint signal SD's schedule leaves at its last step (where sampling starts from pure noise)."""
    import torch
    from diffusers import DDPMScheduler

    from core.base.text import tokenize

    scheduler = DDPMScheduler(**noise_schedule())
    # Noise levels in proportion to 1/alpha_bar (capped): the weighting a v-prediction loss gives. Uniform
    # levels leave the noisiest steps, where the text must decide a shape's colour, nearly untrained.
    odds = (1.0 / scheduler.alphas_cumprod).clamp(max=settings.timestep_odds_cap)
    generator = torch.Generator().manual_seed(settings.seed + 2)
    ids = tokenize(tokenizer, captions + [""])
    empty = ids[-1]
    optimizer = torch.optim.AdamW([{"params": list(unet.parameters()), "lr": settings.learning_rate},
                                   {"params": list(text_encoder.parameters()), "lr": settings.text_learning_rate}],
                                  weight_decay=0.0)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    warmup = max(1, min(100, settings.steps // 10))
    lr_at = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    average = copy.deepcopy(unet).requires_grad_(False)
    unet.train()
    text_encoder.train()
    for step in range(settings.steps):
        pick = torch.randint(len(latents), (settings.batch_size,), generator=generator)
        batch_ids = ids[pick].clone()
        batch_ids[torch.rand(len(pick), generator=generator) < settings.caption_dropout] = empty
        clean = latents[pick]
        noise = torch.randn(clean.shape, generator=generator)
        noise += settings.noise_offset * torch.randn((*clean.shape[:2], 1, 1), generator=generator)
        t = torch.multinomial(odds, len(pick), replacement=True, generator=generator)
        prediction = unet(scheduler.add_noise(clean, noise, t), t, text_encoder(batch_ids)[0]).sample
        loss = torch.nn.functional.mse_loss(prediction, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_at.step()
        optimizer.zero_grad(set_to_none=True)
        _ema_update(average, unet, min(settings.ema_decay, (step + 1) / (step + 10)))
        if step % 100 == 0 or step == settings.steps - 1:
            log(f"unet step {step + 1}/{settings.steps} loss {loss.item():.4f}")
    text_encoder.eval()
    return average.eval()


def _ema_update(average, model, decay: float) -> None:
    import torch

    with torch.no_grad():
        for mean, live in zip(average.parameters(), model.parameters(), strict=True):
            mean.lerp_(live, 1.0 - decay)


def build_pipeline(settings: BuildSettings, log: Callable[[str], None] = lambda text: None):
    """Draw, train and return the demo ``StableDiffusionPipeline`` (fp32, on the CPU)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from core.base.demo_pictures import draw_any_colour, draw_pictures
    from core.base.tiny_tokenizers import build_tokenizer

    started = time.monotonic()
    tokenizer = build_tokenizer()
    configs = model_configs(tokenizer)
    torch.manual_seed(settings.seed)
    unet = UNet2DConditionModel(**configs["unet"])
    vae = AutoencoderKL(**configs["vae"])
    text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text"]))
    drawn = draw_pictures(settings.pictures, settings.seed)
    pixels = to_pixels([picture for picture, _ in drawn])
    log(f"drew {len(drawn)} captioned pictures and as many in any colour for the VAE")
    train_vae(vae, to_pixels(draw_any_colour(settings.pictures, settings.seed + 1)), settings, log)
    pin_posterior(vae)
    latents = encode(vae, pixels)
    scale = 1.0 / latents.std().item()
    vae.register_to_config(scaling_factor=round(scale, 5))
    log(f"vae trained ({time.monotonic() - started:.0f} s); latent scaling factor {scale:.4f}")
    captions = [caption for _, caption in drawn]
    train_text_encoder(text_encoder, tokenizer, captions, settings, log)
    unet = train_denoiser(unet, text_encoder, tokenizer, latents * vae.config.scaling_factor, captions, settings,
                          log)
    log(f"unet trained ({time.monotonic() - started:.0f} s)")
    sampler = DDIMScheduler(**noise_schedule(), clip_sample=False, set_alpha_to_one=False)
    return StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=sampler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def write_demo_model(directory: str | Path, steps: int = DEFAULT_STEPS, seed: int = 0,
                     log: Callable[[str], None] = lambda text: None) -> Path:
    """Build the demo model and write it as a diffusers folder (UNet and VAE fp16, text encoder fp32).

    The folder must not exist or be empty; it appears only once complete (``core.fsutil.new_folder``).
    """
    import torch

    from core.fsutil import new_folder
    from core.quiet import quiet_transformers

    settings = BuildSettings.for_steps(steps, seed)
    threads = torch.get_num_threads()
    # One thread: the same result on any machine with the same libraries, and on a busy 2-core machine
    # several times faster than two threads fighting other processes (these networks are too small to share).
    torch.set_num_threads(1)
    try:
        with new_folder(directory) as tmp:  # refuses a non-empty folder before the (slow) build
            pipe = build_pipeline(settings, log)
            with quiet_transformers():
                pipe.save_pretrained(tmp, safe_serialization=True)
            for part in ("unet", "vae"):
                _halve(tmp / part / "diffusion_pytorch_model.safetensors")
    finally:
        torch.set_num_threads(threads)
    return Path(directory)


def _halve(file: Path) -> None:
    """Rewrite a safetensors file with its fp32 tensors in fp16 (half the size)."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = {name: t.half() if t.dtype == torch.float32 else t for name, t in load_file(file).items()}
    save_file(tensors, file, metadata={"format": "pt"})
