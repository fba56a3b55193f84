"""A model's text encoder(s) as one module: one for SD 1.x and 2.x, two for SDXL.

Training, accelerate's ``prepare``/``save_state``, the caches and sampling all
handle a single ``TextEncoders`` whatever the family; the ``Family`` decides
how token ids become the UNet's conditioning (see ``core.base.families``).
"""

from __future__ import annotations

import torch

from core.base.families import Family


class TextEncoders(torch.nn.Module):
    def __init__(self, family: Family, tokenizers: list, encoders: list[torch.nn.Module]):
        super().__init__()
        self.family = family
        self.tokenizers = list(tokenizers)
        self.encoders = torch.nn.ModuleList(encoders)

    @property
    def max_length(self) -> int:
        return self.tokenizers[0].model_max_length

    def tokenize(self, captions: list[str]) -> list[torch.Tensor]:
        """Token ids per tokenizer, padded/truncated to each one's window."""
        return [tokenize(tokenizer, captions) for tokenizer in self.tokenizers]

    def forward(self, ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden states for cross-attention, pooled embedding or None)."""
        return self.family.encode(self.encoders, ids)

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self(self.tokenize(captions))


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
