"""Optimizers and learning-rate schedules of a run, from the libraries made for them.

* ``adamw`` (torch), ``adamw8bit`` / ``paged_adamw8bit`` / ``lion8bit``
  (bitsandbytes: 8-bit state; "paged" lets the state spill to system RAM
  under memory pressure; Lion keeps one momentum and wants a 3-10x smaller
  learning rate), ``prodigy`` (prodigyopt: it estimates the step size itself,
  so the learning rate is a multiplier around 1.0), ``adafactor``
  (transformers': factored second moments, optionally its own relative step
  size) and ``schedulefree_adamw`` (schedulefree: no schedule; the weights to
  use are an average the optimizer keeps, which ``averaged_weights`` swaps in
  for validation, samples and every saved LoRA file).
* LoRA+ (Hayou et al., 2024): the B ("up") matrices learn ``loraplus_lr_ratio``
  times faster than the A matrices (``param_groups``).
* Schedules: diffusers' constant, linear, cosine, cosine with restarts and
  polynomial; warmup-stable-decay from transformers (constant, then a decay
  over the last ``lr_decay_fraction`` of the run).
"""

from __future__ import annotations

import contextlib

import torch

from core.config import TrainConfig
from core.events import Emit, Message

# Optimizers that set their own step size or schedule: no learning-rate schedule on top of them.
SELF_SCHEDULED = ("schedulefree_adamw",)


def param_groups(config: TrainConfig, denoiser_params: list, text_params: list, named: dict,
                 block_weight=None) -> list[dict]:
    """The optimizer's groups: the denoiser's and the text encoders' LoRA (their own learning rate), each split
    into A and B matrices with LoRA+ (``named``: parameter -> its name), the denoiser's also by learning-rate
    weight per block (``block_weight``: parameter name -> weight, lora.block_lr_weights)."""
    lr, ratio = config.train.learning_rate, config.train.loraplus_lr_ratio
    text_lr = config.lora.text_encoder_learning_rate or lr
    groups = []
    parts = [(denoiser_params, lr, block_weight), (text_params, text_lr, None)]
    for params, base_lr, weight_of in parts:
        by_weight: dict[float, list] = {}
        for p in params:
            by_weight.setdefault(weight_of(named.get(id(p), "")) if weight_of else 1.0, []).append(p)
        for weight, members in by_weight.items():
            if not ratio:
                groups.append({"params": members, "lr": base_lr * weight})
                continue
            ups = [p for p in members if ".lora_B." in named.get(id(p), "")]
            downs = [p for p in members if ".lora_B." not in named.get(id(p), "")]
            groups += [{"params": downs, "lr": base_lr * weight}, {"params": ups, "lr": base_lr * weight * ratio}]
    return [g for g in groups if g["params"]]


def build_optimizer(config: TrainConfig, groups: list[dict], emit: Emit):
    t = config.train
    betas, decay = (t.adam_beta1, t.adam_beta2), t.weight_decay
    name = t.optimizer
    if name == "prodigy":
        from prodigyopt import Prodigy

        if t.learning_rate < 0.1:
            emit(Message("warning", f"Prodigy estimates the step size itself; train.learning_rate = "
                                    f"{t.learning_rate:g} scales it down (1.0 is what it expects)"))
        # Bias correction and warmup safeguard: Prodigy's own advice for diffusion models.
        return Prodigy(groups, betas=betas, weight_decay=decay, d_coef=t.prodigy_d_coef,
                       safeguard_warmup=t.prodigy_safeguard_warmup, use_bias_correction=True)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        if t.adafactor_relative_step:  # its own time-dependent step size; learning_rate is not used
            for group in groups:
                group["lr"] = None
            return Adafactor(groups, relative_step=True, scale_parameter=True, warmup_init=True,
                             weight_decay=decay)
        return Adafactor(groups, relative_step=False, scale_parameter=False, warmup_init=False, weight_decay=decay)
    if name == "schedulefree_adamw":
        import schedulefree

        optimizer = schedulefree.AdamWScheduleFree(groups, betas=betas, eps=t.adam_epsilon, weight_decay=decay,
                                                   warmup_steps=t.lr_warmup_steps)
        optimizer.train()
        return optimizer
    kwargs = dict(betas=betas, eps=t.adam_epsilon, weight_decay=decay)
    if name in ("adamw8bit", "paged_adamw8bit", "lion8bit"):
        try:
            import bitsandbytes as bnb

            if name == "lion8bit":
                return bnb.optim.Lion8bit(groups, betas=betas, weight_decay=decay)
            cls = bnb.optim.PagedAdamW8bit if name == "paged_adamw8bit" else bnb.optim.AdamW8bit
            return cls(groups, **kwargs)
        except Exception as exc:  # missing package, or a build that cannot run on this machine
            emit(Message("warning", f"bitsandbytes' {name} is not available here ({type(exc).__name__}: {exc}); "
                                    f"using torch AdamW instead (more optimizer memory)"))
    return torch.optim.AdamW(groups, **kwargs)


def build_lr_scheduler(config: TrainConfig, optimizer, total_steps: int, num_processes: int):
    """The schedule after warmup (accelerate steps a prepared scheduler once per process per step)."""
    from diffusers.optimization import get_scheduler

    t = config.train
    warmup, total = t.lr_warmup_steps * num_processes, total_steps * num_processes
    if t.optimizer in SELF_SCHEDULED or (t.optimizer == "adafactor" and t.adafactor_relative_step):
        return get_scheduler("constant", optimizer)  # the optimizer schedules itself (warmup included)
    if t.lr_scheduler == "warmup_stable_decay":
        from transformers.optimization import get_wsd_schedule

        decay = int(total * t.lr_decay_fraction)
        return get_wsd_schedule(optimizer, num_warmup_steps=warmup, num_decay_steps=decay,
                                num_training_steps=total, min_lr_ratio=0.0, decay_type="linear")
    name = t.lr_scheduler
    if name == "constant" and warmup:
        name = "constant_with_warmup"
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total,
                         num_cycles=t.lr_scheduler_num_cycles, power=t.lr_scheduler_power)


def _inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimizer


@contextlib.contextmanager
def averaged_weights(optimizer):
    """Inside: the weights a schedule-free optimizer means (its average), for validation, samples and saved
    files; outside: the ones it trains. Nothing changes for other optimizers."""
    inner = _inner(optimizer)
    switch = hasattr(inner, "eval") and hasattr(inner, "train") and "train_mode" in inner.param_groups[0]
    if switch:
        inner.eval()
    try:
        yield
    finally:
        if switch:
            inner.train()


def use_averaged_weights(optimizer) -> None:
    """Leave a schedule-free optimizer's model on its averaged weights (after the last step)."""
    inner = _inner(optimizer)
    if hasattr(inner, "eval") and "train_mode" in inner.param_groups[0]:
        inner.eval()


# Bytes of optimizer state per trained parameter (the planner's count; Adafactor's factored moments are a
# row and a column per matrix, about (rows + columns) / (rows x columns) of the weights: counted per rank).
def state_bytes(params: int, optimizer: str, rank: int = 16) -> int:
    if optimizer in ("adamw8bit", "paged_adamw8bit"):
        return int(params * (2 + 8 / 256))  # two uint8 moments and a fp32 scale per block of 256
    if optimizer == "lion8bit":
        return int(params * (1 + 4 / 256))
    if optimizer == "prodigy":
        return params * 16  # two moments, the starting point and its running sum, fp32
    if optimizer == "adafactor":
        return int(params * 4 * 2 / max(rank, 1))
    return params * 8  # AdamW, schedule-free AdamW: two fp32 tensors per weight
