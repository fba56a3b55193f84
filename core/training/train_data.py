"""Training examples: each image placed in its bucket, cached, augmented and batched within its bucket.

``build_entries`` encodes what the cache lacks (VAE latents per bucket size,
a second latent of the mirrored image when random flips are on, and the text
embedding of each caption) and returns one ``Entry`` per image that reads the
cache lazily, so RAM stays flat for big datasets.

``BucketBatchSampler`` decides everything random about an epoch from the seed
and the epoch number alone: which images share a batch (always one bucket),
the batch order, and per drawn example a seed for its flip and caption
augmentation. A resumed run therefore sees exactly the data a straight run
would, and every process of a multi-GPU run agrees on the order.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from core.config import TrainConfig
from core.data.buckets import Placement, bucket_sizes, fitted, place
from core.data.dataset import ImageItem
from core.events import Emit, Message, Phase
from core.training.pictures import PixelAugment, load_pixels, mask_loader, pixels_loader


@dataclass
class Entry:
    """One image ready to train: its caption, placement and (lazy) cached features."""

    item: ImageItem
    placement: Placement
    latents: Callable[[bool], dict] | None  # flipped -> {"mean", "std"} from the cache, or {"latent": a
    # function giving them, encoding the picture first if the cache lacks it}
    pixels: Callable[..., torch.Tensor] | None  # (flipped, PixelAugment | None) -> (3, H, W), latents not cached
    text: Callable[[], dict] | None  # cached text conditioning of the caption ({"hidden"[, "pooled"]}), if cached
    mask: Callable[..., torch.Tensor] | None = None  # (flipped, placement) -> (1, H/8, W/8) loss weights (masked_loss)
    weight: float = 1.0  # of its loss: train.prior_loss_weight for a class picture (regularisation)

    @property
    def caption(self) -> str:
        return self.item.caption


def example(entry: Entry, flipped: bool = False, caption: str | None = None,
            text: Callable[[], dict] | None = None, pixels: PixelAugment | None = None) -> dict:
    """The tensors of one example; ``caption``/``text`` replace the entry's own, ``pixels`` changes the picture
    (augmentation)."""
    placement = pixels.placed(entry.placement) if pixels is not None else entry.placement
    out = {"caption": entry.caption if caption is None else caption,
           "path": str(entry.item.path),  # named in the error when a step diverges
           "time_ids": torch.tensor(placement.time_ids(flipped), dtype=torch.float32),
           "weight": torch.tensor(entry.weight, dtype=torch.float32)}
    if entry.latents is not None:
        out.update(entry.latents(flipped))
    else:
        out["pixels"] = entry.pixels(flipped, pixels)
    text = text if caption is not None else entry.text
    if text is not None:
        out.update(text())
    if entry.mask is not None:
        out["mask"] = entry.mask(flipped, placement)
    return out


@dataclass
class Augment:
    """Per-draw changes to an example, all decided by a seed (see BucketBatchSampler)."""

    flip: bool = False
    shuffle: bool = False
    keep_tokens: int = 0
    dropout: float = 0.0
    empty_text: Callable[[], dict] | None = None  # cached conditioning of "", for dropped captions
    tag_dropout: float = 0.0
    random_crop: bool = False
    color_jitter: float = 0.0
    hue_jitter: float = 0.0

    @classmethod
    def from_config(cls, config: TrainConfig, empty_text=None) -> Augment:
        d = config.dataset
        return cls(d.random_flip, d.shuffle_captions, d.keep_tokens, d.caption_dropout, empty_text, d.tag_dropout,
                   d.random_crop, d.color_jitter, d.hue_jitter)

    def __call__(self, entry: Entry, seed: int | None) -> dict:
        if seed is None:
            return example(entry)
        rng = random.Random(seed)
        # Always draw all three numbers, so one option never shifts another's randomness.
        flip_draw, drop_draw, shuffle_seed = rng.random(), rng.random(), rng.getrandbits(32)
        flipped = self.flip and flip_draw < 0.5
        pixels = self.pixel_augment(shuffle_seed ^ 0xC0105)  # its own draws, from the shuffle's seed
        if self.dropout and drop_draw < self.dropout:
            return example(entry, flipped, "", self.empty_text, pixels)
        caption = entry.caption
        if self.tag_dropout:  # decided from the shuffle's seed: no other option's draw moves
            caption = drop_tags(caption, self.keep_tokens, self.tag_dropout, shuffle_seed ^ 0x5EED)
        if self.shuffle:
            caption = shuffle_tags(caption, self.keep_tokens, shuffle_seed)
        if caption != entry.caption or self.shuffle:
            return example(entry, flipped, caption, None, pixels)
        return example(entry, flipped, pixels=pixels)

    def pixel_augment(self, seed: int) -> PixelAugment | None:
        """This draw's crop and colour change (None when those options are off)."""
        if not (self.random_crop or self.color_jitter or self.hue_jitter):
            return None
        rng = random.Random(seed)
        crop = (rng.random(), rng.random())
        factors = [1 + rng.uniform(-self.color_jitter, self.color_jitter) for _ in range(3)]
        hue = rng.uniform(-self.hue_jitter, self.hue_jitter)
        return PixelAugment(crop if self.random_crop else None, *factors, hue)


def drop_tags(caption: str, keep: int, probability: float, seed: int) -> str:
    """Leave out each comma-separated tag after the first ``keep`` with ``probability``."""
    rng = random.Random(seed)
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    return ", ".join(tags[:keep] + [t for t in tags[keep:] if rng.random() >= probability])


def shuffle_tags(caption: str, keep: int, seed: int) -> str:
    """Shuffle comma-separated tags, keeping the first ``keep`` in place."""
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    head, tail = tags[:keep], tags[keep:]
    random.Random(seed).shuffle(tail)
    return ", ".join(head + tail)


class Examples(torch.utils.data.Dataset):
    """Indexable by ``(entry index, augmentation seed)`` as BucketBatchSampler yields them."""

    def __init__(self, entries: list[Entry], augment: Augment):
        self.entries = entries
        self.augment = augment

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, key) -> dict:
        index, seed = key if isinstance(key, tuple) else (key, None)
        return self.augment(self.entries[index], seed)


class _Epoch:
    """Holds the epoch number; accelerate calls ``set_epoch`` on a batch sampler's ``sampler``."""

    def __init__(self):
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


class BucketBatchSampler(torch.utils.data.Sampler):
    """Batches of one bucket each, every image ``repeats`` times per epoch, shuffled by seed and epoch."""

    batch_size = None  # batches differ in size (a bucket's last one is short); accelerate shards them whole
    drop_last = False

    def __init__(self, buckets: list[tuple[int, int]], repeats: list[int], batch_size: int, seed: int):
        self.buckets = buckets
        self.repeats = repeats
        self.per_batch = batch_size
        self.seed = seed
        self.sampler = _Epoch()

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def _members(self) -> dict[tuple[int, int], list[int]]:
        members: dict[tuple[int, int], list[int]] = {}
        for index, (bucket, n) in enumerate(zip(self.buckets, self.repeats, strict=True)):
            members.setdefault(bucket, []).extend([index] * n)
        return members

    def __len__(self) -> int:
        return sum(-(-len(m) // self.per_batch) for m in self._members().values())

    def __iter__(self):
        rng = random.Random(f"{self.seed}/{self.sampler.epoch}")
        batches = []
        members = self._members()
        for bucket in sorted(members):
            indices = members[bucket]
            rng.shuffle(indices)
            batches += [indices[i:i + self.per_batch] for i in range(0, len(indices), self.per_batch)]
        rng.shuffle(batches)
        for batch in batches:
            yield [(index, rng.getrandbits(63)) for index in batch]


def collate(examples: list[dict]) -> dict:
    """Examples stacked into a batch; tensors of different lengths (Z-Image's text states, one row per
    token of each caption) are zero-padded to the longest, with their lengths as ``KEY_lengths``."""
    batch = {}
    for key in examples[0]:
        values = [ex[key] for ex in examples]
        if isinstance(values[0], torch.Tensor) and len({v.shape for v in values}) > 1:
            lengths = torch.tensor([v.shape[0] for v in values])
            batch[key] = torch.nn.utils.rnn.pad_sequence(values, batch_first=True)
            batch[f"{key}_lengths"] = lengths
        elif isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        else:
            batch[key] = values
    return batch


# ------------------------------------------------------------------ placing


def placements(config: TrainConfig, items: list[ImageItem]) -> list[Placement]:
    """Each image's bucket (or the resolution square when buckets are off)."""
    d = config.dataset
    if not d.buckets:
        return [fitted(item.size, (d.resolution, d.resolution)) for item in items]
    sizes = bucket_sizes(d.resolution, d.bucket_step, d.bucket_min_side, d.bucket_max_side)
    max_side = d.bucket_max_side or d.resolution * 2
    return [place(item.size, sizes, d.bucket_step, d.no_upscale, max_side) for item in items]


def bucket_record(config: TrainConfig, items: list[ImageItem], places: list[Placement]) -> dict:
    """The bucket table and every image's placement, as recorded in the run folder (buckets.json)."""
    from core.data.buckets import aspect_error, bucket_table

    d = config.dataset
    repeats = [item.repeats * d.repeats for item in items]
    root = Path(d.path)
    return {
        "enabled": d.buckets,
        "resolution": d.resolution,
        "step": d.bucket_step,
        "no_upscale": d.no_upscale,
        "mean_aspect_error": round(aspect_error(places), 4),
        "buckets": bucket_table(places, repeats),
        "images": [{
            "file": _relative(item.path, root),
            "bucket": list(p.bucket),
            "original_size": list(p.original),
            "crop_top_left": list(p.crop),
            "target_size": [p.bucket[1], p.bucket[0]],
            "repeats": n,
        } for item, p, n in zip(items, places, repeats, strict=True)],
    }


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


# ------------------------------------------------------------------ caching


def build_entries(config: TrainConfig, items: list[ImageItem], base, cache, emit: Emit, what: str,
                  flips: bool = False, encoder: LatentEncoder | None = None) -> list[Entry]:
    """One entry per image: latents (and flipped latents) and text embeddings from the cache.

    Text the cache lacks is encoded now. Latents the cache lacks are encoded by ``encoder`` when a step
    first draws their picture, or (without one) now, a few pictures of one bucket at a time; either way
    in the run's compute precision (``encode_latent_distribution``).
    """
    if not items:
        return []
    places = placements(config, items)
    keys = ([_latent_keys(item.path, placement, base, cache, config) for item, placement in zip(items, places,
                                                                                              strict=True)]
            if config.dataset.cache_latents else [])
    if keys and encoder is None:
        _encode_missing(items, places, keys, base, cache, emit, what, flips, _encode_dtype(config))
    cache_text = text_is_cached(config)
    entries = []
    for i, (item, placement) in enumerate(zip(items, places, strict=True)):
        if keys and encoder is not None:
            latents = encoder.loader(item.path, placement, keys[i], flips)
        else:
            latents = _latents_loader(cache, keys[i]) if keys else None
        pixels = None if keys else pixels_loader(item.path, placement)
        text = cached_text(item.caption, base, cache) if cache_text else None
        mask = mask_loader(item, placement) if config.dataset.masked_loss else None
        entries.append(Entry(item, placement, latents, pixels, text, mask))
    return entries


ENCODE_PIXELS = 2 * 512 * 512  # per VAE call while caching: two 512 px pictures, one of 768 or 1024 px


def pictures_per_encode(bucket: tuple[int, int]) -> int:
    """How many pictures of one bucket size one VAE call encodes (an fp32 encode of a 512 px picture takes
    about 0.7 GB of activations, one of 1024 px 2.7 GB)."""
    return max(1, min(4, ENCODE_PIXELS // (bucket[0] * bucket[1])))


def _encode_missing(items, places, keys, base, cache, emit: Emit, what: str, flips: bool, dtype) -> None:
    """Encode and store every latent the cache lacks, grouped by bucket into batches."""
    todo: dict[tuple[int, int], list] = {}
    for item, placement, item_keys in zip(items, places, keys, strict=True):
        for flipped in (False, True) if flips else (False,):
            if not cache.has("latents", item_keys[flipped]):
                todo.setdefault(placement.bucket, []).append((item.path, placement, flipped, item_keys[flipped]))
    total = len(items) * (2 if flips else 1)
    done = total - sum(len(group) for group in todo.values())
    emit(Phase(f"caching {what} latents", done, total))
    for group in todo.values():
        for batch in _encode_and_store(base.vae, cache, dtype, group):
            done += len(batch)
            emit(Phase(f"caching {what} latents", done, total))


def _encode_and_store(vae, cache, dtype, group: list):
    """Encode ``group`` ((path, placement, flipped, key) of one bucket size) a VAE call at a time
    (``pictures_per_encode``) and store each latent; yields each stored batch."""
    from core.training.cache import encode_latent_distribution

    per_call = pictures_per_encode(group[0][1].bucket)
    for start in range(0, len(group), per_call):
        batch = group[start:start + per_call]
        pixels = torch.stack([load_pixels(path, placement, flipped) for path, placement, flipped, _ in batch])
        dist = encode_latent_distribution(vae, pixels, dtype)
        for i, (*_, key) in enumerate(batch):
            cache.store("latents", key, {k: v[i] for k, v in dist.items()})
        yield batch


class LatentEncoder:
    """Latents cached while training: a picture is encoded (with its mirror image when flips are on) the
    first time a step draws it, so the first step comes without waiting for the whole dataset. The VAE
    stays on the card until every latent is in the cache, then ``settle`` sends it away."""

    def __init__(self, config: TrainConfig, base, cache, device, emit: Emit):
        self.base, self.cache, self.device, self.emit = base, cache, device, emit
        self.dtype = _encode_dtype(config)
        self.pending: set[str] = set()  # keys not in the cache yet (other processes may fill some)
        self.encoded = 0
        self.vae_on_card = False

    def loader(self, path: Path, placement: Placement, keys: dict[bool, str], flips: bool
               ) -> Callable[[bool], dict]:
        wanted = (False, True) if flips else (False,)
        self.pending.update(keys[f] for f in wanted if not self.cache.has("latents", keys[f]))
        read = _latents_loader(self.cache, keys)

        def latent(flipped: bool) -> dict:
            missing = [f for f in wanted if keys[f] in self.pending and not self.cache.has("latents", keys[f])]
            if missing:
                self.encode(path, placement, {f: keys[f] for f in missing})
            return read(flipped)

        # Deferred to the step that uses it (``latents_from_batch``): the data loader fetches a batch ahead,
        # and the first step should not wait for two batches' encoding.
        return lambda flipped: {"latent": lambda: latent(flipped)}

    def encode(self, path: Path, placement: Placement, keys: dict[bool, str]) -> None:
        if not self.vae_on_card:  # a resumed run or another process left some pictures for later
            self.base.vae.to(self.device)
            self.vae_on_card = True
        group = [(path, placement, flipped, key) for flipped, key in keys.items()]
        for _ in _encode_and_store(self.base.vae, self.cache, self.dtype, group):
            pass
        self.pending.difference_update(keys.values())
        self.encoded += len(keys)

    def start(self) -> None:
        """Put the VAE where the first steps need it: on the card while latents are missing."""
        self.vae_on_card = bool(self.pending)
        self.base.vae.to(self.device if self.vae_on_card else "cpu")

    def settle(self, recheck: bool = False) -> None:
        """Once every latent is cached, the VAE leaves the card; ``recheck`` also counts the ones other
        processes of a multi-GPU run cached (done at the end of an epoch)."""
        if recheck:
            self.pending = {key for key in self.pending if not self.cache.has("latents", key)}
        if self.pending or not self.vae_on_card:
            return
        self.base.vae.to("cpu")
        self.vae_on_card = False
        where = "; the VAE leaves the GPU" if torch.device(self.device).type != "cpu" else ""
        self.emit(Message("info", f"all latents are cached ({self.encoded} encoded while training){where}"))


def _encode_dtype(config: TrainConfig) -> torch.dtype:
    from core.precision import torch_dtype

    return torch_dtype(config.train.mixed_precision)


def _latent_keys(path: Path, placement: Placement, base, cache, config: TrainConfig) -> dict[bool, str]:
    """The cache keys of a picture's latent and its mirror image; latents encoded in half precision are kept
    apart from fp32 ones."""
    from core.data.images import file_digest

    width, height = placement.bucket
    dtype = _encode_dtype(config)
    vae = base.fingerprint("vae") + ("" if dtype == torch.float32 else f"-{str(dtype).removeprefix('torch.')}")
    digest = file_digest(path)
    return {flipped: cache.latent_key(digest, width, height, vae, flipped) for flipped in (False, True)}


def text_is_cached(config: TrainConfig) -> bool:
    """Text embeddings are cached unless the text encoder trains or the caption changes per draw."""
    d = config.dataset
    return not config.lora.train_text_encoder and not d.shuffle_captions and not d.tag_dropout


def placement(config: TrainConfig) -> dict[str, str]:
    """Where the frozen parts stay while training ("device" or "cpu"): the text encoders and the VAE leave
    the card once their outputs are cached (and come back only to draw sample images)."""
    return {"unet": "device", "text": "cpu" if text_is_cached(config) else "device",
            "vae": "cpu" if config.dataset.cache_latents else "device"}


def _latents_loader(cache, keys: dict[bool, str]) -> Callable[[bool], dict]:
    def get(flipped: bool) -> dict:
        return {"mean": _read(cache, "latents", keys[flipped], "mean"),
                "std": _read(cache, "latents", keys[flipped], "std")}

    return get


TEXT_BATCH = 16  # captions per text-encoder call while caching


def cache_texts(captions: list[str], base, cache) -> None:
    """Encode and store the text conditioning of every caption the cache lacks, a batch at a time."""
    missing = [c for c in dict.fromkeys(captions) if not cache.has("text", _text_key(c, base, cache))]
    for start in range(0, len(missing), TEXT_BATCH):
        batch = missing[start:start + TEXT_BATCH]
        hidden, pooled = base.text.encode(batch)
        for i, caption in enumerate(batch):
            if base.family.variable_text:  # the caption's own tokens only (``pooled`` holds their counts)
                tensors = {"hidden": hidden[i, :int(pooled[i])].float()}
            else:
                tensors = {"hidden": hidden[i].float()}
            if pooled is not None and not base.family.variable_text:
                tensors["pooled"] = pooled[i].float()
            cache.store("text", _text_key(caption, base, cache), tensors)


def _text_key(caption: str, base, cache) -> str:
    return cache.text_key(caption, base.fingerprint("text"), base.text.window_key)


def cached_text(caption: str, base, cache) -> Callable[[], dict]:
    """A loader of the caption's cached text conditioning (encoding it now if the cache lacks it)."""
    key = _text_key(caption, base, cache)
    names = ("hidden", "pooled") if base.family.pooled else ("hidden",)
    cache_texts([caption], base, cache)
    return lambda: {name: _read(cache, "text", key, name) for name in names}


def _read(cache, kind: str, key: str, name: str) -> torch.Tensor:
    tensors = cache.load(kind, key)
    if tensors is None:
        raise RuntimeError(f"cache entry {cache.path(kind, key)} disappeared or is damaged during "
                           f"training; delete the cache folder and restart")
    return tensors[name]


def build_dataloader(config: TrainConfig, entries: list[Entry], empty_text=None):
    repeats = [entry.item.repeats * config.dataset.repeats for entry in entries]
    sampler = BucketBatchSampler([e.placement.bucket for e in entries], repeats, config.train.batch_size,
                                 config.train.seed)
    return torch.utils.data.DataLoader(Examples(entries, Augment.from_config(config, empty_text)),
                                       batch_sampler=sampler, collate_fn=collate)
