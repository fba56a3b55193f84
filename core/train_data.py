"""Training examples: cached latents and text embeddings (or pixels) per image, repeated and batched."""

from __future__ import annotations

from pathlib import Path

import torch

from core.config import TrainConfig
from core.dataset import ImageItem
from core.events import Emit, Phase


class LatentDataset(torch.utils.data.Dataset):
    """Training examples: cached latent distributions (or pixels) and captions, repeated."""

    def __init__(self, entries: list[dict], repeats: int = 1):
        self.entries = entries
        self.repeats = repeats

    def __len__(self) -> int:
        return len(self.entries) * self.repeats

    def __getitem__(self, index: int) -> dict:
        entry = self.entries[index % len(self.entries)]
        return {key: (value() if callable(value) else value) for key, value in entry.items()}


def collate(examples: list[dict]) -> dict:
    batch = {}
    for key in examples[0]:
        values = [ex[key] for ex in examples]
        batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return batch


def build_entries(config: TrainConfig, items: list[ImageItem], base, cache, emit: Emit, what: str) -> list[dict]:
    """One entry per image: latents and text embeddings from the cache (encoding what is missing)."""
    from core.cache import encode_latent_distribution, encode_text
    from core.images import file_digest, fit_image, load_image, to_tensor

    size = config.dataset.resolution
    vae_fp, text_fp = base.fingerprint("vae"), base.fingerprint("text_encoder")
    cache_text = not config.lora.train_text_encoder
    entries = []
    for i, item in enumerate(items):
        emit(Phase(f"caching {what} latents", i, len(items)))
        entry = {"caption": item.caption}
        if config.dataset.cache_latents:
            key = cache.latent_key(file_digest(item.path), size, size, vae_fp)
            if not cache.has("latents", key):
                pixels = to_tensor(fit_image(load_image(item.path), size, size)[0])[None]
                cache.store("latents", key, {k: v[0] for k, v in encode_latent_distribution(base.vae, pixels).items()})
            entry.update(_lazy_tensors(cache, "latents", key, ("mean", "std")))
        else:
            entry["pixels"] = _lazy_pixels(item.path, size)
        if cache_text:
            key = cache.text_key(item.caption, text_fp, base.tokenizer.model_max_length)
            if not cache.has("text", key):
                hidden = encode_text(base.tokenizer, base.text_encoder, [item.caption])
                cache.store("text", key, {"hidden": hidden[0].float()})
            entry.update(_lazy_tensors(cache, "text", key, ("hidden",)))
        entries.append(entry)
    emit(Phase(f"caching {what} latents", len(items), len(items)))
    return entries


def _lazy_tensors(cache, kind: str, key: str, names: tuple[str, ...]) -> dict:
    """Entry values that read the cache file when the example is drawn (keeps RAM flat for big sets)."""

    def getter(name):
        def get():
            tensors = cache.load(kind, key)
            if tensors is None:
                raise RuntimeError(f"cache entry {cache.path(kind, key)} disappeared or is damaged during "
                                   f"training; delete the cache folder and restart")
            return tensors[name]
        return get

    return {name: getter(name) for name in names}


def _lazy_pixels(path: Path, size: int):
    from core.images import fit_image, load_image, to_tensor

    return lambda: to_tensor(fit_image(load_image(path), size, size)[0])


def build_dataloader(config: TrainConfig, entries: list[dict]):
    generator = torch.Generator().manual_seed(config.train.seed)
    return torch.utils.data.DataLoader(
        LatentDataset(entries, config.dataset.repeats),
        batch_size=config.train.batch_size,
        shuffle=True,
        generator=generator,
        collate_fn=collate,
        drop_last=False,
    )
