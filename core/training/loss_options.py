"""The loss and noise options of a training step, for every family (as sd-scripts names and computes them).

* ``train.loss_type``: "l2" (mean squared error), "huber" or "smooth_l1"
  (pseudo-Huber, ``2c(sqrt(d^2 + c^2) - c)`` and ``2(sqrt(d^2 + c^2) - c)``:
  quadratic near zero, linear beyond ``c``, so outlier pixels pull less),
  with ``c`` per noise level from ``train.huber_schedule``: "constant"
  (``train.huber_c``), "exponential" (from 1 at t = 0 down to ``huber_c`` at
  t = 1000) or "snr" (``(1 - huber_c) / (1 + n)^2 + huber_c`` for the noise
  ratio n: near 1 for clean inputs, ``huber_c`` for pure noise).
* ``train.debiased_estimation``: each example weighted by ``1 / sqrt(SNR)``
  (Yu et al., 2024), SNR capped at 1000.
* ``train.multires_noise_iterations``: "pyramid" noise, lower-resolution
  noise added at ``multires_noise_discount`` per octave and renormalised.
* ``train.ip_noise_gamma``: input perturbation (Ning et al., 2023): the
  model's input is noised with ``noise + gamma * extra``, the target keeps
  ``noise``.
* ``train.min_timestep`` / ``max_timestep``: the range of noise levels drawn
  (of 1000; for the flow families the same share of sigma).

The noise ratio ``n`` of a level is ``sqrt((1 - a) / a)`` for the DDPM
schedule's cumulative alpha ``a``, and ``sigma / (1 - sigma)`` on a flow.
"""

from __future__ import annotations

import math

import torch

from core.config import TrainConfig


def per_example(pred: torch.Tensor, target: torch.Tensor, loss_type: str = "l2", c: torch.Tensor | None = None,
                mask: torch.Tensor | None = None):
    """The loss of each example, averaged over its elements; ``c`` (one per example) for the Huber kinds;
    ``mask`` (B, 1, h, w) weights each position (``dataset.masked_loss``), brought to the prediction's grid."""
    diff = pred.float() - target.float()
    if loss_type == "l2":
        loss = diff ** 2
    else:
        c = c.float().view(-1, *[1] * (diff.dim() - 1))
        root = torch.sqrt(diff ** 2 + c ** 2) - c
        loss = 2 * c * root if loss_type == "huber" else 2 * root
    if mask is not None:
        loss = loss * mask_weights(mask, loss.shape[-2:]).to(loss.device)
    return loss.mean(dim=tuple(range(1, diff.dim())))


def mask_weights(mask: torch.Tensor, size) -> torch.Tensor:
    """Loss weights at ``size``: the mask averaged over each cell (a latent grid, or FLUX.2's and Z-Image's
    patches of 2x2 latents), so a half-covered cell weighs half."""
    mask = mask.float()
    return mask if tuple(mask.shape[-2:]) == tuple(size) else torch.nn.functional.interpolate(mask, size=size,
                                                                                               mode="area")


def huber_c(config: TrainConfig, noise_ratio: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
    """``c`` per example from the schedule; ``time`` on the 0-1000 scale."""
    t = config.train
    if t.huber_schedule == "constant":
        return torch.full_like(noise_ratio, t.huber_c)
    if t.huber_schedule == "exponential":
        return torch.exp(math.log(t.huber_c) * time.float() / 1000)
    return (1 - t.huber_c) / (1 + noise_ratio) ** 2 + t.huber_c


def ddpm_noise_ratio(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return torch.sqrt((1 - alphas) / alphas)


def flow_noise_ratio(sigmas: torch.Tensor) -> torch.Tensor:
    s = sigmas.float().clamp(1e-6, 1 - 1e-6)
    return s / (1 - s)


def debiased_weight(noise_ratio: torch.Tensor) -> torch.Tensor:
    snr = (1 / noise_ratio.clamp(min=1e-6) ** 2).clamp(max=1000)
    return 1 / torch.sqrt(snr)


def weighted(config: TrainConfig, pred, target, noise_ratio, time, mask=None) -> torch.Tensor:
    """The configured per-example loss (type, Huber schedule, debiased weight, loss mask)."""
    t = config.train
    c = huber_c(config, noise_ratio, time) if t.loss_type != "l2" else None
    loss = per_example(pred, target, t.loss_type, c, mask)
    if t.debiased_estimation:
        loss = loss * debiased_weight(noise_ratio)
    return loss


def pyramid_noise(noise: torch.Tensor, generator, iterations: int, discount: float) -> torch.Tensor:
    """Noise with low-frequency parts: for each octave, random noise at a quarter of the pixels (halved sides,
    at least 1), upsampled and added at ``discount ** octave``; then scaled back to unit variance."""
    b, c, h, w = noise.shape
    out = noise.clone()
    for i in range(1, iterations + 1):
        side_h, side_w = max(1, h // 2 ** i), max(1, w // 2 ** i)
        coarse = torch.randn((b, c, side_h, side_w), generator=generator, device=noise.device, dtype=noise.dtype)
        out = out + torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear") * discount ** i
        if side_h == 1 and side_w == 1:
            break
    return out / out.std()


def step_noise(config: TrainConfig, latents: torch.Tensor, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(the noise the target is made of, the noise the model's input is made of): offset and pyramid noise in
    both, input perturbation in the second only."""
    t, device = config.train, latents.device
    noise = torch.randn(latents.shape, generator=generator, device=device)
    if t.noise_offset:
        noise = noise + t.noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1),
                                                     generator=generator, device=device)
    if t.multires_noise_iterations:
        noise = pyramid_noise(noise, generator, t.multires_noise_iterations, t.multires_noise_discount)
    if not t.ip_noise_gamma:
        return noise, noise
    return noise, noise + t.ip_noise_gamma * torch.randn(latents.shape, generator=generator, device=device)
