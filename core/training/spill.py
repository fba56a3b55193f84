"""Noticing, during a CUDA run, that GPU memory is spilling into system RAM.

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


def spill_advice(config, reason: str) -> str:
    """The warning line: the sign, what it means, the settings that would lower memory, and the planner."""
    t = config.train
    options = []
    if not t.gradient_checkpointing:
        options.append("train.gradient_checkpointing = true")
    if config.model.quantize == "none":
        options.append("model.quantize = 'nf4'")
    if t.batch_size > 1:
        options.append(f"train.batch_size = {t.batch_size // 2} with gradient_accumulation_steps = "
                       f"{t.gradient_accumulation_steps * 2}")
    if config.lora.train_text_encoder:
        options.append("lora.train_text_encoder = false")
    options.append(f"dataset.resolution below {config.dataset.resolution}")
    return (f"{reason}: memory is probably spilling to system RAM (the driver does this instead of failing), "
            f"which makes training many times slower. Stop and turn on: {'; '.join(options)}. "
            f"'Fit my GPU' in the Train tab (python -m core plan CONFIG --fit) picks settings for this card.")
