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
    def text_key(caption: str, text_fingerprint: str, max_length: int) -> str:
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
def encode_latent_distribution(vae, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """VAE posterior of a batch of [-1, 1] images: per-image mean and std (unscaled)."""
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    return {"mean": dist.mean.float(), "std": dist.std.float()}
