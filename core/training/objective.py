"""The diffusion objective and the held-out validation loss.

Cached VAE latents are noised at a random timestep and the UNet's output is
regressed onto the scheduler's target (the noise for epsilon models, the
velocity for v-prediction), with optional min-SNR-gamma weighting and noise
offset. Validation uses fixed noise at fixed timesteps so values compare.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from core.config import TrainConfig
from core.training.train_data import collate, example


def latents_from_batch(batch: dict, base, generator: torch.Generator | None, device) -> torch.Tensor:
    """Scaled latents for a batch: a fresh draw from the cached posterior (or the mean when no generator)."""
    from core.training.cache import encode_latent_distribution

    if "latent" in batch:  # cached while training: encoded now if this is the picture's first draw
        dists = [latent() for latent in batch["latent"]]
        mean = torch.stack([d["mean"] for d in dists]).to(device)
        std = torch.stack([d["std"] for d in dists]).to(device)
    elif "mean" in batch:
        mean, std = batch["mean"].to(device), batch["std"].to(device)
    else:
        dist = encode_latent_distribution(base.vae, batch["pixels"].to(device))
        mean, std = dist["mean"], dist["std"]
    latents = mean if generator is None else mean + std * torch.randn(
        mean.shape, generator=generator, device=device)
    shift = getattr(base.vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * base.vae.config.scaling_factor


def text_states(batch: dict, base, text_encoder, device) -> tuple[torch.Tensor, dict | None]:
    """Cross-attention states and the family's added conditions (SDXL: pooled text, size/crop ids)."""
    if "hidden" in batch:
        hidden, pooled = batch["hidden"].to(device), batch.get("pooled")
        pooled = pooled.to(device) if pooled is not None else None
    else:  # encoded now: captions change per draw, or the text encoder trains
        hidden, pooled = text_encoder(base.text.tokenize(batch["caption"]))
    time_ids = batch["time_ids"].to(device) if "time_ids" in batch else None
    return hidden, base.family.added_conditions(pooled, time_ids)


def diffusion_loss(unet, scheduler, latents, states, noise, timesteps, min_snr_gamma: float = 0.0,
                   added: dict | None = None) -> torch.Tensor:
    """Per-example MSE between the UNet output and the scheduler's target, optionally min-SNR weighted.

    ``added`` is the UNet's ``added_cond_kwargs`` (SDXL), None for families without them.
    """
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    pred = unet(noisy, timesteps, states, added_cond_kwargs=added, return_dict=False)[0]
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if min_snr_gamma:
        # Min-SNR-gamma (Hang et al., "Efficient Diffusion Training via Min-SNR Weighting Strategy", ICCV
        # 2023, arXiv:2303.09556): weight each timestep by min(SNR, gamma) / SNR for a noise target. For a
        # velocity target the weight is min(SNR, gamma) / (SNR + 1), as kohya's sd-scripts write it
        # (apply_snr_weight), which is what users of A1111-era trainers expect; the diffusers example
        # instead adds one before clamping, min(SNR + 1, gamma) / (SNR + 1), which weights the noisiest
        # steps differently.
        from diffusers.training_utils import compute_snr

        snr = compute_snr(scheduler, timesteps)
        weight = torch.clamp(snr, max=min_snr_gamma) / snr
        if scheduler.config.prediction_type == "v_prediction":
            weight = torch.clamp(snr, max=min_snr_gamma) / (snr + 1)
        loss = loss * weight
    return loss


def training_loss(config: TrainConfig, base, unet, text_encoder, batch, generator, device) -> torch.Tensor:
    latents = latents_from_batch(batch, base, generator, device)
    noise = torch.randn(latents.shape, generator=generator, device=device)
    if config.train.noise_offset:
        noise = noise + config.train.noise_offset * torch.randn(
            (latents.shape[0], latents.shape[1], 1, 1), generator=generator, device=device)
    timesteps = torch.randint(0, base.noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                              generator=generator, device=device)
    states, added = text_states(batch, base, text_encoder, device)
    return diffusion_loss(unet, base.noise_scheduler, latents, states, noise, timesteps,
                          config.train.min_snr_gamma, added).mean()


# ================================================================ validation


class Validator:
    """Held-out loss with fixed noise and fixed timesteps, so values compare across steps and runs."""

    def __init__(self, config: TrainConfig, entries: list, base, device):
        self.entries = entries  # core.training.train_data.Entry, each in its own bucket size
        self.base = base
        self.device = device
        total = base.noise_scheduler.config.num_train_timesteps
        k = config.sample.validation_timesteps
        # Evenly spread, away from both ends (t=0 is trivially easy, t=T-1 nearly pure noise).
        self.timesteps = [int(round((i + 1) * total / (k + 1))) for i in range(k)]
        gen = torch.Generator().manual_seed(config.train.seed + 1_000_003)
        self.noise = []
        for entry in entries:  # drawn in a fixed order, so each image always gets the same noise
            width, height = entry.placement.bucket
            shape = (base.vae.config.latent_channels, height // base.vae_scale_factor,
                     width // base.vae_scale_factor)
            self.noise.append(torch.randn((len(self.timesteps), *shape), generator=gen))

    @torch.no_grad()
    def __call__(self, unet, text_encoder, autocast) -> float | None:
        if not self.entries:
            return None
        losses = []
        for entry, noise in zip(self.entries, self.noise, strict=True):
            batch = collate([example(entry)])
            latents = latents_from_batch(batch, self.base, None, self.device)
            latents = latents.expand(len(self.timesteps), *latents.shape[1:])
            states, added = text_states(batch, self.base, text_encoder, self.device)
            states = _repeat(states, len(self.timesteps))
            if added is not None:
                added = {key: _repeat(value, len(self.timesteps)) for key, value in added.items()}
            timesteps = torch.tensor(self.timesteps, device=self.device)
            with autocast():
                loss = diffusion_loss(unet, self.base.noise_scheduler, latents, states,
                                      noise.to(self.device), timesteps, added=added)
            losses.append(loss.float().mean().item())
        return sum(losses) / len(losses)


def _repeat(tensor: torch.Tensor, n: int) -> torch.Tensor:
    """A batch of one, seen n times (one per validation timestep)."""
    return tensor.expand(n, *tensor.shape[1:])
