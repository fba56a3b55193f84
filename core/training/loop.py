"""The training loop and what it does between steps: validate, sample, save, stop.

``core.training.train`` builds everything the loop needs (models with their
LoRA, optimizer, data, the validator) and hands it over by keyword; the loop
runs optimizer steps until the run's total, a stop request or an error, and
reports each step as an event.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from core.config import TrainConfig
from core.events import CheckpointSaved, Emit, Message, Phase, Progress, SampleWritten, ValidationLoss
from core.training.memory_advice import SpillWatch, out_of_memory_advice, spill_advice
from core.training.objective import Validator, training_loss
from core.training.optimizers import averaged_weights, use_averaged_weights
from core.training.run_folder import RunPaths, prune_step_loras, save_lora, save_state
from core.training.train_data import LatentEncoder


class TrainingError(RuntimeError):
    """The run cannot go on; the message says why and what to change. ``kind`` goes into the error event."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


@dataclass
class RunResult:
    status: str  # "completed" or "stopped"
    step: int
    lora_path: Path
    run_dir: Path
    validation_losses: dict[int, float] = field(default_factory=dict)
    denoiser: object = None  # the trained UNet or transformer with its adapter, only with run(keep_models=True)
    text_encoder: object = None
    base: object = None  # the loaded model parts (for the final check; let go after it)


@dataclass
class TrainState:
    """Progress that must survive a resume; saved with accelerate's state."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    best_validation: float = math.inf
    noise_rng: torch.Tensor | None = None

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)


# =================================================================== phases


@dataclass(kw_only=True)
class Loop:
    """The training loop and what it does between steps (validate, sample, save, stop)."""

    config: TrainConfig
    accelerator: object
    emit: Emit
    should_stop: Callable[[], bool]
    base: object  # core.base.models.BaseModel
    denoiser: torch.nn.Module  # prepared by accelerate (maybe DDP-wrapped)
    text_encoder: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    dataloader: object
    state: TrainState
    generator: torch.Generator  # noise and timesteps; its state is saved with the checkpoint
    total: int  # optimizer steps of the whole run
    data_info: dict  # what the LoRA's metadata records about the data (ss_num_train_images, buckets, tags)
    validator: Validator
    validation_losses: dict[int, float] = field(default_factory=dict)
    ema_losses: dict[int, float] = field(default_factory=dict)  # of the moving average (train.ema)
    last_batch: list[str] = field(default_factory=list)  # image paths of the newest batch
    last_saved: tuple[int, Path] | None = None  # (step, LoRA file) of the newest save
    updating: bool = False  # inside optimizer.step()
    spill: SpillWatch = field(default_factory=SpillWatch)  # GPU memory spilling into system RAM (CUDA)
    encoder: LatentEncoder | None = None  # latents cached while training (the VAE leaves once all are)
    # Cached text of the sample prompts (and the negative prompt), for the flow families: their T5 never comes
    # back to the card for samples. Empty: the text encoders encode each prompt.
    sample_text: dict[str, Callable[[], dict]] = field(default_factory=dict)
    ema: object = None  # core.training.ema.LoraEma (train.ema): validated, sampled and saved beside the weights

    @property
    def paths(self) -> RunPaths:
        return RunPaths.of(self.config)

    def run(self, resume: bool) -> RunResult:
        c, acc, state = self.config, self.accelerator, self.state
        try:
            if not resume and c.sample.at_start:
                self.evaluate()
                self.settle_latents()
            stopped = self.state.step < self.total and self.train()
        except torch.OutOfMemoryError:
            saved = self.rescue()
            raise TrainingError(out_of_memory_advice(c, state.step, saved), "out_of_memory") from None
        lora_path = self.paths.final_lora
        if not stopped:
            self.emit(Phase("final validation and samples", 0, 0))
            self.evaluate()
        self.emit(Phase("saving the LoRA", 0, 0))
        self.save(lora_path)
        use_averaged_weights(self.optimizer)  # schedule-free: the models handed back hold the saved weights
        if c.output.save_diffusers_format and acc.is_main_process:
            self.save_diffusers(self.paths.diffusers_lora)
        status = "stopped" if stopped else "completed"
        acc.end_training()
        return RunResult(status, state.step, lora_path, c.run_dir, self.validation_losses,
                         acc.unwrap_model(self.denoiser), acc.unwrap_model(self.text_encoder), self.base)

    def train(self) -> bool:
        """Run optimizer steps until the total is reached; True if stopped early."""
        c, acc, state = self.config, self.accelerator, self.state
        models = [self.denoiser, self.text_encoder] if c.lora.train_text_encoder else [self.denoiser]
        for model in models:
            model.train()
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        timer = _Rate()
        losses: list[torch.Tensor] = []
        step_started = time.perf_counter()  # an optimizer step's own time, without validation and samples
        while True:
            self.dataloader.set_epoch(state.epoch)
            batches = (acc.skip_first_batches(self.dataloader, state.batches_in_epoch)
                       if state.batches_in_epoch else self.dataloader)
            for batch in batches:
                self.last_batch = list(batch.get("path", []))
                # forward, backward, update (accelerate decides when accumulation is complete)
                with acc.accumulate(*models):
                    loss = training_loss(c, self.base, self.denoiser, self.text_encoder, batch, self.generator,
                                         acc.device)
                    acc.backward(loss)
                    if acc.sync_gradients and c.train.max_grad_norm:
                        acc.clip_grad_norm_(params, c.train.max_grad_norm)
                    self.updating = True  # an error from here on leaves the weights half updated
                    self.optimizer.step()
                    self.updating = False
                    self.lr_scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                state.batches_in_epoch += 1
                losses.append(loss.detach())
                if not acc.sync_gradients:
                    continue
                state.step += 1
                if self.ema is not None:
                    self.ema.update(state.step)
                self.report(torch.stack(losses).mean(), timer.tick())
                self.watch_memory(time.perf_counter() - step_started)
                losses = []
                self.settle_latents()
                outside = time.perf_counter()
                if self.between_steps():
                    return True
                timer.skip(time.perf_counter() - outside)
                step_started = time.perf_counter()
                if state.step >= self.total:
                    return False
            state.epoch += 1
            state.batches_in_epoch = 0
            self.settle_latents(recheck=True)
            every = self.config.output.save_every_n_epochs
            saved_now = self.last_saved is not None and self.last_saved[0] == state.step
            if every and state.epoch % every == 0 and 0 < state.step < self.total and not saved_now:
                self.save(self.paths.step_lora(state.step))

    def settle_latents(self, recheck: bool = False) -> None:
        """The VAE leaves the card once every latent is cached (see LatentEncoder)."""
        if self.encoder is not None:
            self.encoder.settle(recheck)

    def report(self, loss: torch.Tensor, rate: float) -> None:
        loss = self.accelerator.gather(loss[None]).mean().item()
        if not math.isfinite(loss):
            raise TrainingError(self.divergence(f"the training loss became {loss}"), "diverged")
        remaining = self.total - self.state.step
        lr = self.lr_scheduler.get_last_lr()[0]
        self.emit(Progress(self.state.step, self.total, self.state.epoch, loss, lr, rate,
                           remaining / rate if rate else 0.0))
        if self.config.output.tensorboard:
            self.accelerator.log({"loss": loss, "learning_rate": lr}, step=self.state.step)

    def watch_memory(self, step_seconds: float) -> None:
        """On CUDA, warn once when the card is full or steps slow down as when memory spills to system RAM."""
        device = self.accelerator.device
        if device.type != "cuda" or not self.accelerator.is_main_process:
            return
        total = torch.cuda.get_device_properties(device).total_memory
        reason = self.spill.check(step_seconds, torch.cuda.memory_reserved(device), total)
        if reason:
            self.emit(Message("warning", spill_advice(self.config, reason)))

    def between_steps(self) -> bool:
        """Periodic validation, samples and checkpoints; then True if a stop was asked for."""
        c, step = self.config, self.state.step
        if c.sample.every_n_steps and step % c.sample.every_n_steps == 0 and step < self.total:
            self.evaluate()
        if c.output.save_every_n_steps and step % c.output.save_every_n_steps == 0 and step < self.total:
            self.save(self.paths.step_lora(step))
        if self.should_stop() or self.paths.stop.exists():
            self.accelerator.set_trigger()
        return self.accelerator.check_trigger()

    def evaluate(self) -> None:
        """Validation loss and sample images at the current step (main process; the others wait)."""
        acc = self.accelerator
        unet = acc.unwrap_model(self.denoiser)
        text_encoder = acc.unwrap_model(self.text_encoder)
        with averaged_weights(self.optimizer):
            self._evaluate(unet, text_encoder)
        if self.ema is not None:
            with self.ema.weights():
                self._evaluate(unet, text_encoder, ema=True)
        acc.wait_for_everyone()

    def _evaluate(self, unet, text_encoder, ema: bool = False) -> None:
        acc = self.accelerator
        if acc.is_main_process:
            unet.eval()
            text_encoder.eval()
            loss = self.validator(unet, text_encoder, acc.autocast)
            if loss is not None:
                losses = self.ema_losses if ema else self.validation_losses
                best = loss < min(losses.values(), default=math.inf) if ema else loss < self.state.best_validation
                if not ema:
                    self.state.best_validation = min(loss, self.state.best_validation)
                losses[self.state.step] = loss
                self.emit(ValidationLoss(self.state.step, loss, best, ema))
                if self.config.output.tensorboard:
                    acc.log({"validation_loss_ema" if ema else "validation_loss": loss}, step=self.state.step)
            self.write_samples(unet, text_encoder, "ema" if ema else "")
            unet.train()
            if self.config.lora.train_text_encoder:
                text_encoder.train()

    def write_samples(self, unet, text_encoder, kind: str = "") -> None:
        from core.base.sample import generate, pipeline_from_parts
        from core.fsutil import save_image

        c = self.config
        if not c.sample.prompts:
            return
        # The VAE comes to the card for the samples; the text encoders only until each prompt is encoded
        # (core.training.plan counts the samples phase this way).
        vae_device, text_device = self.base.vae.device, _device_of(text_encoder)
        self.base.vae.to(self.accelerator.device)
        zero_snr = bool(self.base.noise_scheduler.config.get("rescale_betas_zero_snr", False))
        pipe = pipeline_from_parts(self.base.path, self.base.vae, text_encoder, unet, c.sample.sampler, zero_snr)
        for i, prompt in enumerate(c.sample.prompts):
            embeds = self.sample_embeds(prompt)
            if embeds is None:
                text_encoder.to(self.accelerator.device)
            with self.accelerator.autocast():
                image = generate(pipe, prompt, seed=c.sample.seed, steps=c.sample.steps,
                                 guidance_scale=c.sample.guidance_scale,
                                 width=c.sample.width or c.dataset.resolution,
                                 height=c.sample.height or c.dataset.resolution,
                                 negative_prompt=c.sample.negative_prompt,
                                 after_first_step=lambda: text_encoder.to(text_device), embeds=embeds,
                                 clip_skip=self.base.text.clip_skip, chunks=self.base.text.chunks)
            path = self.paths.sample(self.state.step, i, kind)
            save_image(path, image)
            if c.output.tensorboard:
                from core.training.tracking import log_image

                log_image(self.accelerator, f"sample {i}{' (EMA)' if kind else ''}", image, self.state.step)
            self.emit(SampleWritten(self.state.step, str(path), prompt, c.sample.seed))
        self.base.vae.to(vae_device)
        text_encoder.to(text_device)

    def sample_embeds(self, prompt: str) -> dict | None:
        """The cached conditioning of a sample prompt and of the negative prompt, on the device; None when
        the prompts are not cached (the text encoders then encode them)."""
        if prompt not in self.sample_text:
            return None
        device = self.accelerator.device
        as_batch = lambda text: {k: v.unsqueeze(0).to(device) for k, v in text.items()}  # noqa: E731
        family = self.base.family
        negative = self.config.sample.negative_prompt if family.negative_prompt else ""
        return family.pipeline_embeds(as_batch(self.sample_text[prompt]()), as_batch(self.sample_text[negative]()))

    def save(self, lora_path: Path) -> None:
        """The LoRA file (main process) and, if enabled, the resume state (all processes).

        Weights that hold NaN or infinity are never written: neither as a LoRA
        file nor as the resume state a later --resume would trust.
        """
        acc, c = self.accelerator, self.config
        self.require_finite()
        if acc.is_main_process:
            with averaged_weights(self.optimizer):  # a schedule-free optimizer's averaged weights are the LoRA
                save_lora(c, acc, self.denoiser, self.text_encoder, lora_path, self.state.step, self.data_info,
                          self.base)
            self.emit(CheckpointSaved(self.state.step, str(lora_path), "lora"))
            self.last_saved = (self.state.step, lora_path)
            self.check_export(lora_path)
            if self.ema is not None:
                ema_path = self.paths.ema_lora(lora_path)
                with self.ema.weights():
                    save_lora(c, acc, self.denoiser, self.text_encoder, ema_path, self.state.step, self.data_info,
                              self.base)
                self.emit(CheckpointSaved(self.state.step, str(ema_path), "lora"))
                self.check_export(ema_path)
            for old in prune_step_loras(self.paths, c.output.keep_last_n, self.validation_losses):
                self.emit(Message("info", f"removed {old.name} (output.keep_last_n = {c.output.keep_last_n})"))
        if c.output.save_state:
            self.state.noise_rng = self.generator.get_state()
            path = save_state(c, acc, self.state.step)
            self.emit(CheckpointSaved(self.state.step, str(path), "state"))
        acc.wait_for_everyone()

    def require_finite(self) -> None:
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        bad = sum(int((~torch.isfinite(p.detach())).sum()) for p in params)
        if bad:
            raise TrainingError(self.divergence(f"{bad:,} LoRA weight values became NaN or infinite"), "diverged")

    def divergence(self, what: str) -> str:
        """What went wrong when training diverged, the likely causes (with this run's values) and what is kept."""
        c = self.config
        from core.precision import label

        precision = label(self.accelerator.mixed_precision)
        causes = [f"train.learning_rate = {c.train.learning_rate:g} is too high (try {c.train.learning_rate / 10:g})"]
        scale = c.lora.alpha / c.lora.rank
        if scale > 1:
            causes.append(f"lora.alpha = {c.lora.alpha:g} over lora.rank = {c.lora.rank} multiplies every update "
                          f"by {scale:g} (keep alpha at or below the rank)")
        if precision == "fp16":
            causes.append("fp16 overflows easily: use train.mixed_precision = 'bf16' if the GPU has it")
        names = ", ".join(Path(p).name for p in self.last_batch) or "unknown"
        causes.append(f"a broken picture in the last batch ({names}): check it with the health report")
        if self.last_saved:
            step, path = self.last_saved
            kept = f"The last good LoRA is {path.name} (step {step})"
            kept += "; --resume continues from the state saved with it." if c.output.save_state else "."
        else:
            kept = "No LoRA had been saved yet."
        return (f"{what} at step {self.state.step}, training in {precision}; nothing was saved at this step. "
                f"Likely causes: {'; '.join(causes)}. {kept}")

    def rescue(self) -> Path | None:
        """After running out of memory: free what the failed step held and save the last completed step.

        Nothing is saved when the error came in the middle of the optimizer
        update (the weights are then half old, half new).
        """
        import gc

        self.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if self.updating or self.state.step == 0:
            return None
        path = self.paths.step_lora(self.state.step)
        try:
            self.save(path)
        except (torch.OutOfMemoryError, TrainingError):
            return None
        return path

    def save_diffusers(self, path: Path) -> None:
        from core.lora.lora_diffusers import save_diffusers_lora
        from core.training.run_folder import save_dtype

        acc, c = self.accelerator, self.config
        text = acc.unwrap_model(self.text_encoder) if c.lora.train_text_encoder else None
        save_diffusers_lora(path, acc.unwrap_model(self.denoiser), text, self.base.family.name, save_dtype(c))
        self.emit(CheckpointSaved(self.state.step, str(path), "lora"))
        self.check_export(path)

    def check_export(self, lora_path: Path) -> None:
        """Every key of the file just written must land on a module of the base model (cheap: no images)."""
        from core.lora.verify import event, verify_loaded

        text = self.accelerator.unwrap_model(self.text_encoder)
        result = verify_loaded(lora_path, self.accelerator.unwrap_model(self.denoiser), list(text.encoders),
                               self.base.family)
        self.emit(event(result, self.state.step))
        if lora_path == self.paths.final_lora:
            for warning in result.warnings:
                self.emit(Message("warning", f"{lora_path.name}: {warning}"))
        if not result.ok:
            found = [f"{len(result.unmatched)} module(s) do not map onto the base model"] if result.unmatched else []
            self.emit(Message("warning", f"{lora_path.name} failed its check: " + "; ".join(found + result.problems)))


def _device_of(module) -> torch.device:
    return next(module.parameters()).device


class _Rate:
    """Optimizer steps per second over the recent steps (a moving window), not counting the time spent
    between steps (validation, samples, saves), so the time left does not jump after each of them."""

    def __init__(self, window: int = 20):
        self.times: list[float] = [time.perf_counter()]
        self.window = window

    def tick(self) -> float:
        self.times.append(time.perf_counter())
        self.times = self.times[-(self.window + 1):]
        elapsed = self.times[-1] - self.times[0]
        return (len(self.times) - 1) / elapsed if elapsed > 0 else 0.0

    def skip(self, seconds: float) -> None:
        """Leave ``seconds`` (just spent outside training steps) out of the window."""
        self.times = [t + seconds for t in self.times]
