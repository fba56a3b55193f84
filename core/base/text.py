"""A model's text encoder(s) as one module: one for SD 1.x and 2.x, two for SDXL and FLUX, three for SD 3.5.

Training, accelerate's ``prepare``/``save_state``, the caches and sampling all
handle a single ``TextEncoders`` whatever the family; the ``Family`` decides
how token ids become the UNet's conditioning (see ``core.base.families``).
"""

from __future__ import annotations

import torch

from core.base.families import Family


class TextEncoders(torch.nn.Module):
    def __init__(self, family: Family, tokenizers: list, encoders: list[torch.nn.Module],
                 lengths: tuple[int | None, ...] | None = None):
        super().__init__()
        self.family = family
        self.clip_skip = 1  # SD 1.x/2.x: model.clip_skip (see Family.encode)
        self.chunks = 1  # SD 1.x/2.x/SDXL: dataset.max_token_length / 75, CLIP windows per caption
        self.tokenizers = list(tokenizers)
        self.encoders = torch.nn.ModuleList(encoders)
        # Tokens per tokenizer: CLIP's own 77-token window; T5's is the family's (256 or 512), not its config's.
        self.lengths = tuple(length or tok.model_max_length
                             for tok, length in zip(self.tokenizers, lengths or (None,) * len(self.tokenizers),
                                                    strict=True))
        for tokenizer, encoder in zip(self.tokenizers, self.encoders, strict=True):
            config = getattr(encoder, "config", None)
            if tokenizer is not None and config is not None and getattr(config, "pad_token_id", None) is None:
                config.pad_token_id = tokenizer.pad_token_id  # what the encoder masks (Qwen3's config has none)

    @property
    def max_length(self) -> int:
        """The first (CLIP) tokenizer's window, which caption lengths are measured against."""
        return self.lengths[0]

    @property
    def window_key(self) -> str:
        """All token windows, for cache keys (SD families: the one CLIP window, as before T5 came)."""
        key = str(self.lengths[0]) if len(set(self.lengths)) == 1 else ",".join(map(str, self.lengths))
        key = key if self.chunks <= 1 else f"{key}x{self.chunks}"
        return key if self.clip_skip <= 1 else f"{key}+skip{self.clip_skip}"

    def trainable(self) -> list[torch.nn.Module]:
        """The encoders that may get a LoRA (the CLIP ones; never T5)."""
        return [e for i, e in enumerate(self.encoders) if i in self.family.trainable_text]

    def train(self, mode: bool = True):
        """Training mode for the encoders that carry a LoRA only: T5 (dropout 0.1 in its config) stays in eval
        mode, or it would encode every caption differently while the CLIP encoders train."""
        super().train(mode)
        for i, encoder in enumerate(self.encoders):
            if i not in self.family.trainable_text:
                encoder.eval()
        return self

    def tokenize(self, captions: list[str]) -> list[torch.Tensor]:
        """Token ids per tokenizer, padded/truncated to each one's window (through the family: Qwen-based
        ones wrap the caption in their chat template first)."""
        if self.chunks > 1:
            return [chunked_ids(tokenizer, captions, self.chunks) for tokenizer in self.tokenizers]
        return self.family.tokenize(self.tokenizers, captions, self.lengths)

    def forward(self, ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden states for cross-attention, pooled embedding or None)."""
        window = self.lengths[0]
        if self.family.flow or ids[0].shape[1] <= window:
            return self.family.encode(self.encoders, ids, self.clip_skip)
        # Several CLIP windows per caption (chunked_ids): each encoded on its own, then joined as sd-scripts
        # joins them: the first window's BOS, every window's 75 tokens, the last window's end.
        batch, count = ids[0].shape[0], ids[0].shape[1] // window
        hidden, pooled = self.family.encode(self.encoders, [i.reshape(batch * count, window) for i in ids],
                                            self.clip_skip)
        hidden = hidden.reshape(batch, count, window, -1)
        body = hidden[:, :, 1:-1].reshape(batch, count * (window - 2), -1)
        hidden = torch.cat([hidden[:, 0, :1], body, hidden[:, -1, -1:]], dim=1)
        return hidden, None if pooled is None else pooled.reshape(batch, count, -1)[:, 0]

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self(self.tokenize(captions))


def tokenize(tokenizer, captions: list[str], length: int | None = None) -> torch.Tensor:
    return tokenizer(
        captions,
        padding="max_length",
        max_length=length or tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def chunked_ids(tokenizer, captions: list[str], chunks: int) -> torch.Tensor:
    """Captions of up to ``chunks`` x 75 tokens as ``chunks`` CLIP windows side by side, (batch, chunks x 77),
    as A1111 and sd-scripts cut them: each window BOS, 75 of the caption's tokens, then EOS (or padding when
    the caption ended before); a window past the caption's end reads as an empty prompt."""
    window = tokenizer.model_max_length
    body = window - 2
    full = tokenizer(captions, padding="max_length", max_length=body * chunks + 2, truncation=True,
                     return_tensors="pt").input_ids
    bos, eos, pad = full[:, :1], tokenizer.eos_token_id, tokenizer.pad_token_id
    parts = []
    for i in range(chunks):
        tokens = full[:, 1 + body * i: 1 + body * (i + 1)].clone()
        tokens[tokens[:, 0] == pad, 0] = eos  # nothing left of the caption: an empty prompt's EOS
        end = full[:, -1:].clone()  # EOS when the caption fills every window, else padding
        end[(tokens[:, -1] != eos) & (tokens[:, -1] != pad), 0] = eos  # a window cut mid-caption ends too
        parts.append(torch.cat([bos, tokens, end], dim=1))
    return torch.cat(parts, dim=1)
