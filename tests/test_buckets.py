"""Aspect-ratio buckets, batching within a bucket, and per-draw augmentation (flip, caption shuffle, dropout)."""

import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from core.data.buckets import Placement, aspect_error, bucket_sizes, bucket_table, fitted, format_table, place
from core.data.dataset import ImageItem
from core.training.train_data import Augment, BucketBatchSampler, Entry, Examples, shuffle_tags

SD15 = bucket_sizes(512)


def test_bucket_sizes_follow_the_step_and_area():
    assert (512, 512) in SD15
    for w, h in SD15:
        assert w % 64 == 0 and h % 64 == 0
        assert w * h <= 512 * 512
        assert 256 <= w <= 1024 and 256 <= h <= 1024
        # one side is the largest in steps of 64 for the other: one more step would exceed the area or max side
        assert any((long + 64) * short > 512 * 512 or long + 64 > 1024 for long, short in ((h, w), (w, h)))
    assert all((h, w) in SD15 for w, h in SD15)  # every shape also turned sideways
    ratios = [w / h for w, h in SD15]
    assert ratios == sorted(ratios)


def test_bucket_sizes_honour_explicit_limits_and_tiny_resolutions():
    sizes = bucket_sizes(1024, step=64, min_side=768, max_side=1344)
    assert min(min(s) for s in sizes) >= 768 and max(max(s) for s in sizes) <= 1344
    assert bucket_sizes(64) == [(64, 64)]
    with pytest.raises(ValueError, match="above the largest"):
        bucket_sizes(512, min_side=1024, max_side=512)


@pytest.mark.parametrize("size, bucket", [
    ((512, 512), (512, 512)), ((4000, 4000), (512, 512)),  # squares of any size
    ((1000, 1500), (384, 640)),  # 2:3 portrait -> 0.6, the closest aspect
    ((1920, 1080), (640, 384)),  # 16:9 -> 1.67
    ((10000, 40), (1024, 256)),  # a strip goes to the widest bucket
    ((40, 10000), (256, 1024)),
])
def test_each_image_goes_to_the_closest_aspect_ratio(size, bucket):
    placement = place(size, SD15)
    assert placement.bucket == bucket
    aspect = math.log(size[0] / size[1])
    best = min(abs(math.log(w / h) - aspect) for w, h in SD15)
    assert abs(math.log(bucket[0] / bucket[1]) - aspect) == pytest.approx(best)


@pytest.mark.parametrize("size", [(1000, 1500), (1920, 1080), (777, 555), (10000, 40), (300, 200)])
def test_resize_covers_the_bucket_and_crops_minimally(size):
    p = place(size, SD15)
    bw, bh = p.bucket
    rw, rh = p.resized
    assert rw >= bw and rh >= bh
    # one side matches the bucket exactly: any smaller resize would not cover it
    assert rw == bw or rh == bh
    top, left = p.crop
    assert (top, left) == ((rh - bh) // 2, (rw - bw) // 2)
    # aspect kept: the other side is the exact scaled length, rounded
    assert min(abs(rw - size[0] * rh / size[1]), abs(rh - size[1] * rw / size[0])) <= 0.5


def test_no_upscale_keeps_small_images_at_their_own_size():
    small = place((300, 200), SD15, step=64, no_upscale=True)
    assert small.bucket == (256, 192)
    assert small.scale <= 1.0 and small.resized[0] <= 300 and small.resized[1] <= 200
    assert place((300, 200), SD15).scale > 1.0  # without the option it is enlarged
    big = place((2000, 1500), SD15, no_upscale=True)
    assert big.bucket in SD15 and big.scale < 1.0  # large images use the normal buckets
    strip = place((10000, 40), SD15, step=64, no_upscale=True, max_side=1024)
    # its 40 px side is below one step: enlarged only to 64, not to the 256 of the normal widest bucket
    assert strip.bucket == (1024, 64) and strip.resized[1] == 64


def test_time_ids_record_size_and_crop_and_mirror_when_flipped():
    p = fitted((1000, 500), (512, 256))  # resized to 512x256: no crop
    assert p.time_ids() == [500, 1000, 0, 0, 256, 512]
    p = fitted((1200, 500), (512, 256))  # resized 614x256, cropped 51 px from the left
    assert p.resized == (614, 256) and p.crop == (0, 51)
    assert p.time_ids() == [500, 1200, 0, 51, 256, 512]
    assert p.time_ids(flipped=True) == [500, 1200, 0, 614 - 51 - 512, 256, 512]


def test_bucket_table_counts_images_and_draws():
    places = [place(s, SD15) for s in [(512, 512), (600, 600), (1000, 1500)]]
    table = bucket_table(places, repeats=[1, 2, 5])
    assert table == [{"width": 384, "height": 640, "images": 1, "per_epoch": 5},
                     {"width": 512, "height": 512, "images": 2, "per_epoch": 3}]
    text = format_table(table)
    assert "384×640" in text and "0.60" in text
    assert aspect_error(places) == pytest.approx(abs(1000 / 1500 - 0.6) / 3)


# --------------------------------------------------------------------------
# batching


def _sampler(buckets, repeats=None, batch=2, seed=0):
    return BucketBatchSampler(buckets, repeats or [1] * len(buckets), batch, seed)


def test_batches_come_from_one_bucket_and_cover_every_repeat():
    buckets = [(64, 64)] * 5 + [(96, 48)] * 3 + [(48, 96)]
    repeats = [1, 1, 1, 1, 1, 2, 2, 2, 3]
    sampler = _sampler(buckets, repeats, batch=2)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 3 + 3 + 2  # ceil(5/2) + ceil(6/2) + ceil(3/2)
    for batch in batches:
        assert len({buckets[i] for i, _ in batch}) == 1
        assert 1 <= len(batch) <= 2
    drawn = Counter(i for batch in batches for i, _ in batch)
    assert drawn == Counter({i: n for i, n in enumerate(repeats)})


def test_order_is_fixed_by_seed_and_epoch():
    buckets = [(64, 64)] * 6 + [(96, 48)] * 6

    def order(seed, epoch):
        sampler = _sampler(buckets, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(0, 0) == order(0, 0)  # same seed and epoch: same batches and augmentation seeds
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)


# --------------------------------------------------------------------------
# augmentation


def _entry(caption="sks, red hat, smiling, outdoors", size=(64, 32)):
    item = ImageItem(Path("x.png"), caption, None, size)
    means = {False: torch.zeros(4, 4, 8), True: torch.ones(4, 4, 8)}

    def latents(flipped):
        return {"mean": means[flipped], "std": torch.zeros(4, 4, 8)}

    return Entry(item, fitted(size, size), latents, None, lambda: {"hidden": torch.full((3, 2), 7.0)})


def test_shuffle_keeps_the_leading_tags():
    caption = "sks, a, b, c, d, e, f"
    shuffled = {shuffle_tags(caption, 1, seed) for seed in range(50)}
    assert len(shuffled) > 10
    assert all(s.startswith("sks, ") and sorted(s.split(", ")) == sorted(caption.split(", ")) for s in shuffled)
    assert shuffle_tags(caption, 7, 3) == caption


def test_augment_flips_shuffles_and_drops_by_seed():
    entry = _entry()
    plain = Augment()(entry, 123)
    assert plain["caption"] == entry.caption and torch.equal(plain["mean"], torch.zeros(4, 4, 8))
    assert torch.equal(plain["hidden"], torch.full((3, 2), 7.0))

    flips = [Augment(flip=True)(entry, seed) for seed in range(200)]
    flipped = [bool(ex["mean"].sum()) for ex in flips]
    assert 70 < sum(flipped) < 130  # about half, using the cached flipped latent
    for ex, f in zip(flips, flipped, strict=True):
        assert ex["time_ids"].tolist() == entry.placement.time_ids(f)

    empty = lambda: {"hidden": torch.zeros(3, 2)}  # noqa: E731
    drops = [Augment(dropout=0.25, empty_text=empty)(entry, seed) for seed in range(400)]
    dropped = [ex for ex in drops if ex["caption"] == ""]
    assert 60 < len(dropped) < 140
    assert all(torch.equal(ex["hidden"], torch.zeros(3, 2)) for ex in dropped)

    shuffled = {Augment(shuffle=True, keep_tokens=1)(entry, seed)["caption"] for seed in range(30)}
    assert len(shuffled) > 3 and all(c.startswith("sks, ") for c in shuffled)
    a, b = Augment(flip=True, shuffle=True)(entry, 7), Augment(flip=True, shuffle=True)(entry, 7)
    assert a["caption"] == b["caption"] and torch.equal(a["mean"], b["mean"])  # the seed decides everything


def test_examples_index_by_entry_and_seed():
    examples = Examples([_entry("a"), _entry("b")], Augment())
    assert examples[(1, 5)]["caption"] == "b"
    assert examples[0]["caption"] == "a"  # a plain index: no augmentation (validation)


def test_placement_is_hashable_and_frozen():
    p = Placement((10, 10), (8, 8), (8, 8), (0, 0))
    with pytest.raises(AttributeError):
        p.bucket = (1, 1)
    assert {p: 1}[Placement((10, 10), (8, 8), (8, 8), (0, 0))] == 1
