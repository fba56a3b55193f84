"""On-disk caches of VAE latents and text embeddings.

Encoding an image with the VAE costs more than a LoRA training step, and the
result never changes while the image, its size and the VAE stay the same. So
each image is encoded once and its latent distribution (mean and std) stored
under a key made of exactly those three things; change any of them and the
key changes, so a stale entry is never used. Text embeddings are cached the
same way, keyed by caption and text encoder.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from core.fsutil import save_safetensors

# Bump when the way images are prepared changes, so old entries are not reused.
_LATENT_FORMAT = "fit-lanczos-center-v2"
_TEXT_FORMAT = "family-conditioning-v2"  # hidden states [+ pooled], per family


class FeatureCache:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    @staticmethod
    def latent_key(image_digest: str, width: int, height: int, vae_fingerprint: str, flip: bool = False) -> str:
        parts = f"{_LATENT_FORMAT}|{image_digest}|{width}x{height}|{vae_fingerprint}|flip={flip}"
        return hashlib.sha256(parts.encode()).hexdigest()[:32]

    @staticmethod
    def text_key(caption: str, text_fingerprint: str, max_length: int | str) -> str:
        parts = f"{_TEXT_FORMAT}|{text_fingerprint}|{max_length}|{caption}"
        return hashlib.sha256(parts.encode()).hexdigest()[:32]

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key[:2] / f"{key}.safetensors"

    def load(self, kind: str, key: str) -> dict[str, torch.Tensor] | None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = self.path(kind, key)
        if not path.is_file():
            return None
        try:
            return load_file(path)
        except (SafetensorError, OSError):
            return None  # a damaged entry is recomputed, not trusted

    def store(self, kind: str, key: str, tensors: dict[str, torch.Tensor]) -> None:
        save_safetensors(self.path(kind, key), {k: v.detach().cpu().contiguous() for k, v in tensors.items()})

    def has(self, kind: str, key: str) -> bool:
        return self.path(kind, key).is_file()


@torch.no_grad()
def encode_latent_distribution(vae, pixels: torch.Tensor, dtype: torch.dtype = torch.float32
                               ) -> dict[str, torch.Tensor]:
    """VAE posterior of a batch of [-1, 1] images: per-image mean and std (unscaled), as fp32.

    ``dtype`` bf16 or fp16 runs the encoder under autocast (its fp32 weights cast per layer, activations
    in half the memory; twice as fast on GPUs); an image whose result overflows (fp16 VAEs do) is encoded
    again in fp32, so only what overflows pays for full precision.
    """
    pixels = pixels.to(vae.device, vae.dtype)
    with torch.no_grad(), torch.autocast(vae.device.type, dtype=dtype, enabled=dtype != torch.float32):
        dist = vae.encode(pixels).latent_dist
    mean, std = dist.mean.float(), dist.std.float()
    bad = ~(torch.isfinite(mean).flatten(1).all(1) & torch.isfinite(std).flatten(1).all(1))
    if dtype != torch.float32 and bad.any():
        with torch.no_grad():
            redo = vae.encode(pixels[bad]).latent_dist
        mean[bad], std[bad] = redo.mean.float(), redo.std.float()
    return {"mean": mean, "std": std}
