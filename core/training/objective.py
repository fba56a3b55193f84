"""The diffusion objectives and the held-out validation loss.

SD 1.x/2.x/SDXL (DDPM): cached VAE latents are noised at a random timestep
and the UNet's output is regressed onto the scheduler's target (the noise for
epsilon models, the velocity for v-prediction), with optional min-SNR-gamma
weighting and noise offset.

SD 3.5 and FLUX (rectified flow): a noise level sigma in [0, 1] is drawn
(uniform, logit-normal or mode density, then shifted towards noise), the
input is the straight line ``(1 - sigma) * latents + sigma * noise`` and the
transformer regresses its velocity ``noise - latents``, optionally weighted
per sigma as in the SD3 paper.

Validation uses fixed noise at fixed timesteps (or sigmas) so values compare.
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
    noise = None if generator is None else torch.randn(mean.shape, generator=generator, device=device)
    return base.family.training_latents(base.vae, mean, std, noise)


def text_states(batch: dict, base, text_encoder, device) -> dict:
    """The denoiser's text conditioning: {"hidden", "pooled", "time_ids"} (the last two where the family has
    them: SDXL's pooled text and size/crop ids, SD 3.5's and FLUX's pooled text)."""
    if "hidden" in batch:
        hidden, pooled = batch["hidden"].to(device), batch.get("pooled")
        pooled = pooled.to(device) if pooled is not None else None
    else:  # encoded now: captions change per draw, or the text encoder trains
        hidden, pooled = text_encoder(base.text.tokenize(batch["caption"]))
    cond = {"hidden": hidden}
    if "hidden_lengths" in batch:  # cached text of each caption's own length (Z-Image), padded by collate
        cond["lengths"] = batch["hidden_lengths"].to(device)
    elif pooled is not None and base.family.variable_text:  # encoded now: the family returns the lengths
        cond["lengths"] = pooled
    elif pooled is not None:
        cond["pooled"] = pooled
    if "time_ids" in batch:
        cond["time_ids"] = batch["time_ids"].to(device)
    return cond


def diffusion_loss(unet, scheduler, latents, states, noise, timesteps, min_snr_gamma: float = 0.0,
                   added: dict | None = None, family=None, cond: dict | None = None, input_noise=None,
                   config: TrainConfig | None = None, mask=None) -> torch.Tensor:
    """Per-example MSE between the UNet output and the scheduler's target, optionally min-SNR weighted.

    The UNet is called through ``family.predict`` with ``cond`` when given; otherwise directly with
    ``states`` and ``added`` (its ``added_cond_kwargs``, SDXL only). ``input_noise`` noises the input instead
    of ``noise`` (input perturbation); ``config`` gives the loss type and weights (core.training.loss_options;
    plain MSE without it); ``mask`` weights positions (dataset.masked_loss).
    """
    noisy = scheduler.add_noise(latents, noise if input_noise is None else input_noise, timesteps)
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    if family is not None:
        pred = family.predict(unet, noisy, timesteps, cond)
    else:
        pred = unet(noisy, timesteps, states, added_cond_kwargs=added, return_dict=False)[0]
    if config is not None:
        from core.training.loss_options import ddpm_noise_ratio, weighted

        loss = weighted(config, pred, target, ddpm_noise_ratio(scheduler, timesteps), timesteps, mask)
    else:
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


def flow_loss(denoiser, family, latents, noise, sigmas, cond: dict, weighting: str = "none", input_noise=None,
              config: TrainConfig | None = None, mask=None) -> torch.Tensor:
    """Per-example rectified-flow loss: the denoiser's velocity at ``(1 - sigma) x + sigma n`` against
    ``n - x``, weighted per sigma (diffusers' SD3 weighting schemes); ``input_noise`` and ``config`` as for
    ``diffusion_loss``."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    s = sigmas.view(-1, 1, 1, 1).to(latents.dtype)
    noisy = (1 - s) * latents + s * (noise if input_noise is None else input_noise)
    pred = family.predict(denoiser, noisy.to(latents.dtype), sigmas, cond)
    target = noise - latents
    if config is not None:
        from core.training.loss_options import flow_noise_ratio, weighted

        loss = weighted(config, pred, target, flow_noise_ratio(sigmas), sigmas * 1000, mask)
    else:
        loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return loss * compute_loss_weighting_for_sd3(weighting, sigmas.float())


def sample_levels(config: TrainConfig, family, count: int, generator, device) -> torch.Tensor:
    """``count`` draws in [0, 1) from the configured density (diffusers' SD3 sampling helper)."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    t = config.train
    scheme = t.timestep_sampling
    if scheme == "auto":
        scheme = ({"sd3": "logit_normal", "zimage": "logit_normal"}.get(family.name, "sigmoid") if family.flow
                  else "uniform")
    if scheme == "sigmoid":  # sd-scripts' spelling of a logit-normal density centred on the middle
        scheme, mean = "logit_normal", 0.0
    else:
        mean = t.logit_mean
    return compute_density_for_timestep_sampling(scheme, count, logit_mean=mean, logit_std=t.logit_std,
                                                 mode_scale=t.mode_scale, device=device, generator=generator)


def flow_shift(config: TrainConfig, scheduler, latent_shape, family) -> float:
    """The shift of sampled sigmas: train.flow_shift, else the scheduler's fixed shift, else (schedulers with
    dynamic shifting) the family's shift for the picture size, as its pipeline computes it at sampling."""
    if config.train.flow_shift:
        return config.train.flow_shift
    if not scheduler.config.get("use_dynamic_shifting", False):
        return float(scheduler.config.get("shift", 1.0))
    return family.dynamic_shift(scheduler.config, latent_shape)


def shifted(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def training_loss(config: TrainConfig, base, unet, text_encoder, batch, generator, device) -> torch.Tensor:
    from core.training.loss_options import step_noise

    t = config.train
    latents = latents_from_batch(batch, base, generator, device)
    noise, input_noise = step_noise(config, latents, generator)
    cond = text_states(batch, base, text_encoder, device)
    low, high = t.min_timestep / 1000, t.max_timestep / 1000  # the range of noise levels drawn
    if base.family.flow:
        cond["guidance"] = t.guidance_scale
        levels = sample_levels(config, base.family, latents.shape[0], generator, device)
        sigmas = low + (high - low) * shifted(levels, flow_shift(config, base.noise_scheduler, latents.shape,
                                                                 base.family))
        return _weighted_mean(flow_loss(unet, base.family, latents, noise, sigmas, cond, t.loss_weighting,
                                        input_noise, config, batch.get("mask")), batch)
    total = base.noise_scheduler.config.num_train_timesteps
    first, last = int(low * total), max(int(high * total), int(low * total) + 1)
    if t.timestep_sampling in ("auto", "uniform"):
        timesteps = torch.randint(first, last, (latents.shape[0],), generator=generator, device=device)
    else:
        levels = sample_levels(config, base.family, latents.shape[0], generator, device)
        timesteps = (first + levels * (last - first)).long().clamp(first, last - 1)
    return _weighted_mean(diffusion_loss(unet, base.noise_scheduler, latents, None, noise, timesteps,
                                         t.min_snr_gamma, family=base.family, cond=cond, input_noise=input_noise,
                                         config=config, mask=batch.get("mask")), batch)


def _weighted_mean(losses: torch.Tensor, batch: dict) -> torch.Tensor:
    """The batch's loss: each example's weighted by its own weight (train.prior_loss_weight for class
    pictures), averaged over the examples."""
    weight = batch.get("weight")
    return (losses * weight.to(losses.device, losses.dtype)).mean() if weight is not None else losses.mean()


# ================================================================ validation


class Validator:
    """Held-out loss with fixed noise and fixed timesteps, so values compare across steps and runs."""

    def __init__(self, config: TrainConfig, entries: list, base, device):
        self.entries = entries  # core.training.train_data.Entry, each in its own bucket size
        self.base = base
        self.device = device
        k = config.sample.validation_timesteps
        self.flow = base.family.flow
        self.guidance = config.train.guidance_scale
        # Evenly spread, away from both ends (t=0 is trivially easy, t=T-1 nearly pure noise); flow models at
        # the same fractions as noise levels (unshifted, so runs at other shifts compare).
        total = 1 if self.flow else base.noise_scheduler.config.num_train_timesteps
        self.timesteps = [(i + 1) / (k + 1) if self.flow else int(round((i + 1) * total / (k + 1)))
                          for i in range(k)]
        gen = torch.Generator().manual_seed(config.train.seed + 1_000_003)
        self.noise = []
        for entry in entries:  # drawn in a fixed order, so each image always gets the same noise
            width, height = entry.placement.bucket
            shape = base.family.latent_shape(base.vae.config, width, height)
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
            cond = {key: _repeat(value, len(self.timesteps))
                    for key, value in text_states(batch, self.base, text_encoder, self.device).items()}
            timesteps = torch.tensor(self.timesteps, device=self.device)
            with autocast():
                if self.flow:
                    loss = flow_loss(unet, self.base.family, latents, noise.to(self.device), timesteps,
                                     {**cond, "guidance": self.guidance})
                else:
                    loss = diffusion_loss(unet, self.base.noise_scheduler, latents, None, noise.to(self.device),
                                          timesteps, family=self.base.family, cond=cond)
            losses.append(loss.float().mean().item())
        return sum(losses) / len(losses)


def _repeat(tensor: torch.Tensor, n: int) -> torch.Tensor:
    """A batch of one, seen n times (one per validation timestep)."""
    return tensor.expand(n, *tensor.shape[1:])
