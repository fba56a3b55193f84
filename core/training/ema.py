"""An exponential moving average of the LoRA weights (``train.ema``), kept in system RAM.

diffusers' ``EMAModel`` does the averaging (and its warm-up: the first update
copies the weights, update n + 1 keeps ``min((1 + n) / (10 + n),
train.ema_decay)`` of the average, so the first updates follow the live
weights closely). Its copy stays on the CPU: each
update (every ``train.ema_update_every`` optimizer steps) brings the live
LoRA weights there, never the other way round, so the GPU holds nothing more.
The loop validates, samples and saves the average (``weights()`` swaps it into
the models for that while) beside the live weights; accelerate saves it with
the resume state.
"""

from __future__ import annotations

import contextlib

import torch


class LoraEma:
    def __init__(self, params: list[torch.nn.Parameter], decay: float, every: int = 1):
        from diffusers.training_utils import EMAModel

        self.params = list(params)
        self.every = max(1, every)
        self.model = EMAModel(self._cpu_copies(), decay=decay, foreach=False)

    def _cpu_copies(self) -> list[torch.Tensor]:
        # requires_grad marks them as trained for EMAModel (it copies frozen ones instead of averaging them)
        return [p.detach().to("cpu", torch.float32, copy=True).requires_grad_(True) for p in self.params]

    def update(self, step: int) -> None:
        """After optimizer step ``step``: average the live weights in, every ``every`` steps."""
        if step % self.every == 0:
            self.model.step(self._cpu_copies())

    @contextlib.contextmanager
    def weights(self):
        """The average in the models' LoRA weights for the duration (the live weights back afterwards)."""
        self.model.store(self.params)
        self.model.copy_to(self.params)
        try:
            yield
        finally:
            self.model.restore(self.params)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
