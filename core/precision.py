"""Precision names, as configs and the command line spell them, and the torch dtypes they stand for.

``fp32``/``fp16``/``bf16`` name a precision everywhere (``train.mixed_precision``
says ``no`` for fp32, as accelerate does). One table, so the trainer, the LoRA
writer and the merge never disagree.
"""

from __future__ import annotations

NAMES = ("fp32", "fp16", "bf16")
_ALIASES = {"no": "fp32"}  # accelerate's name for "no mixed precision"


def label(name: str) -> str:
    """The precision's common name: "no" (accelerate, the config) -> "fp32"."""
    name = _ALIASES.get(name, name)
    if name not in NAMES:
        raise ValueError(f"precision {name!r}: choose one of {', '.join(NAMES)}")
    return name


def torch_dtype(name: str):
    """The torch dtype of a precision name ("fp32", "fp16", "bf16", or accelerate's "no")."""
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[label(name)]
