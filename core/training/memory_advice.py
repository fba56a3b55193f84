"""What to tell a user whose run does not fit its GPU: out of memory, or memory spilling into system RAM.

Both messages name the same settings that would lower memory (``memory_savings``), in the planner's
order, leaving out what the run already does.

On Windows the NVIDIA driver (by default) does not fail when the card is
full: it moves memory to system RAM and the run goes on up to 100 times
slower, with no error anywhere. Two signs give it away: the card's reserved
memory stands within a few percent of its size, or a step takes several
times as long as the steps after warm-up did. ``SpillWatch`` looks for both
after every step and says so once, with what to change.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

GB = 1e9


@dataclass
class SpillWatch:
    warmup: int = 10  # steps before the baseline (the first ones allocate, cache and tune kernels)
    slowdown: float = 3.0  # a window of steps this many times slower than the baseline is a spill
    window: int = 5
    full_share: float = 0.97  # reserved memory at this share of the card is full
    times: list[float] = field(default_factory=list)
    baseline: float | None = None
    warned: bool = False

    def check(self, step_seconds: float, reserved: int | None = None, total: int | None = None) -> str | None:
        """Record one optimizer step's own time (without validation and samples); a warning the first time
        the card looks full or the steps slow down, else None."""
        self.times.append(step_seconds)
        if self.warned:
            return None
        reason = None
        if reserved and total and reserved >= self.full_share * total:
            reason = f"the GPU's memory is full ({reserved / GB:.1f} of {total / GB:.1f} GB reserved)"
        if self.baseline is None and len(self.times) >= self.warmup + self.window:
            self.baseline = statistics.median(self.times[self.warmup:self.warmup + self.window])
        elif self.baseline and len(self.times) >= self.warmup + 2 * self.window:
            recent = statistics.median(self.times[-self.window:])
            if recent > self.slowdown * self.baseline:
                reason = (f"steps take {recent:.2f} s, {recent / self.baseline:.1f}x the {self.baseline:.2f} s "
                          f"they took after warm-up")
        if reason is None:
            return None
        self.warned = True
        return reason


def memory_savings(config) -> list[str]:
    """The settings that would lower this run's GPU memory, most helpful first; none it already has."""
    t, d, lo = config.train, config.dataset, config.lora
    options = []
    if not t.gradient_checkpointing:
        options.append("train.gradient_checkpointing = true (much less memory, about 20% slower)")
    if t.mixed_precision == "no":
        options.append("train.mixed_precision = 'bf16' ('fp16' on GPUs without bf16)")
    if config.model.quantize == "none":
        options.append("model.quantize = 'nf4' (the UNet's weights in about a quarter of the memory)")
    if t.batch_size > 1:
        options.append(f"train.batch_size = {t.batch_size // 2} with train.gradient_accumulation_steps = "
                       f"{t.gradient_accumulation_steps * 2} (the same effective batch)")
    if lo.train_text_encoder:
        options.append("lora.train_text_encoder = false")
    if not d.cache_latents:
        options.append("dataset.cache_latents = true")
    if d.resolution > 512:
        options.append(f"dataset.resolution = {max(512, d.resolution * 3 // 4 // 64 * 64)}")
    if not config.model.group_offload:
        options.append("model.group_offload = true with model.quantize = 'none' and gradient checkpointing "
                       "(the UNet stays in system RAM; much slower)")
    return options


def spill_advice(config, reason: str) -> str:
    """The warning line: the sign, what it means, the settings that would lower memory, and the planner."""
    return (f"{reason}: memory is probably spilling to system RAM (the driver does this instead of failing), "
            f"which makes training many times slower. Stop and change: {'; '.join(memory_savings(config))}. "
            f"'Fit my GPU' in the Train tab (python -m core plan CONFIG --fit) picks settings for this card.")


def out_of_memory_advice(config, step: int | None = None, saved=None) -> str:
    """One line: what ran out, what to change first (only settings that would help this run), what was kept."""
    where = f" at step {step}" if step else ""
    options = [*memory_savings(config), "closing other programs that use the GPU (python -m core plan CONFIG "
               "--fit picks settings for your card)"]
    kept = f" The LoRA of step {step} is saved as {saved.name}" if saved else ""
    if saved and config.output.save_state:
        kept += "; --resume continues from it with the new settings."
    elif saved:
        kept += "."
    return (f"out of GPU memory{where} (batch {config.train.batch_size}, {config.dataset.resolution} px). Try, "
            f"in this order: {'; '.join(options)}.{kept}")
