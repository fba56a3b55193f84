"""Aspect-ratio bucketing: train every picture near its own shape instead of a center square.

A square crop throws away the top and bottom of a portrait or the sides of a
landscape. Instead, a set of training sizes ("buckets") is made, all in steps
of ``step`` pixels with an area close to ``resolution``², from tall to wide;
each picture goes to the bucket whose aspect ratio is closest to its own, is
resized to just cover it and cropped minimally (centred). A batch is always
drawn from one bucket, so its tensors share a shape.

With ``no_upscale`` a picture smaller than the buckets is not enlarged: it
gets a bucket of its own size, rounded down to the step.

Each placement also records what SDXL-style models are conditioned on: the
original size, the crop's top-left corner in the resized picture, and the
target size.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from core.data.images import cover_size


@dataclass(frozen=True)
class Placement:
    """Where one picture trains: its bucket, and how it is resized and cropped to fit."""

    original: tuple[int, int]  # upright width, height
    bucket: tuple[int, int]  # training width, height
    resized: tuple[int, int]  # width, height after the aspect-keeping resize
    crop: tuple[int, int]  # top, left of the crop in the resized picture

    @property
    def scale(self) -> float:
        return self.resized[0] / self.original[0]

    def time_ids(self, flipped: bool = False) -> list[int]:
        """SDXL's micro-conditioning: original (h, w), crop (top, left), target (h, w).

        A horizontally flipped picture's crop is mirrored: its left edge is
        measured from the other side.
        """
        top, left = self.crop
        if flipped:
            left = self.resized[0] - left - self.bucket[0]
        return [self.original[1], self.original[0], top, left, self.bucket[1], self.bucket[0]]


def bucket_sizes(resolution: int, step: int = 64, min_side: int = 0, max_side: int = 0) -> list[tuple[int, int]]:
    """All (width, height) in steps of ``step`` with area at most ``resolution``² and the largest such height.

    Sides run from ``min_side`` (default: half the resolution) to
    ``max_side`` (default: twice the resolution). Sorted by aspect ratio.
    """
    min_side = min_side or max(step, (resolution // 2) // step * step)
    max_side = max_side or resolution * 2
    if min_side > max_side:
        raise ValueError(f"smallest bucket side {min_side} is above the largest {max_side}")
    area = resolution * resolution
    sizes = set()
    for width in range(_round_up(min_side, step), max_side + 1, step):
        height = min(max_side, area // width // step * step)
        if height >= min_side:
            sizes.update({(width, height), (height, width)})
    if not sizes:  # resolution below the step: one square bucket of the step
        sizes.add((step, step))
    return sorted(sizes, key=lambda s: (s[0] / s[1], s[0]))


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


def place(size: tuple[int, int], sizes: list[tuple[int, int]], step: int = 64, no_upscale: bool = False,
          max_side: int = 0) -> Placement:
    """The bucket for a picture of ``size`` (width, height), and its resize and crop.

    The bucket is the one with the closest aspect ratio (on a log scale, so
    2:1 and 1:2 are equally far from square); among equally close, the
    largest. With ``no_upscale``, a picture that would have to be enlarged
    gets a bucket of its own size rounded down to ``step`` (and, if need be,
    shrunk to ``max_side``) instead.
    """
    w, h = size
    if w <= 0 or h <= 0:
        raise ValueError(f"image size must be positive, got {w}x{h}")
    aspect = math.log(w / h)
    bucket = min(sizes, key=lambda s: (abs(math.log(s[0] / s[1]) - aspect), -s[0] * s[1]))
    if no_upscale and (bucket[0] > w or bucket[1] > h) and max(bucket[0] / w, bucket[1] / h) > 1:
        bucket = _own_size_bucket(w, h, step, max_side)
    return fitted(size, bucket)


def fitted(size: tuple[int, int], bucket: tuple[int, int]) -> Placement:
    """How a picture of ``size`` is resized to cover ``bucket`` and center-cropped (as images.fit_image does)."""
    resized = cover_size(size[0], size[1], bucket[0], bucket[1])
    crop = ((resized[1] - bucket[1]) // 2, (resized[0] - bucket[0]) // 2)
    return Placement(tuple(size), tuple(bucket), resized, crop)


def _own_size_bucket(w: int, h: int, step: int, max_side: int) -> tuple[int, int]:
    shrink = min(1.0, max_side / max(w, h)) if max_side else 1.0
    return (max(step, int(w * shrink) // step * step), max(step, int(h * shrink) // step * step))


def bucket_table(placements: list[Placement], repeats: list[int] | None = None) -> list[dict]:
    """Per used bucket: its size, how many pictures, and how many draws per epoch (with repeats)."""
    repeats = repeats or [1] * len(placements)
    images = Counter(p.bucket for p in placements)
    draws = Counter()
    for p, n in zip(placements, repeats, strict=True):
        draws[p.bucket] += n
    return [{"width": w, "height": h, "images": images[(w, h)], "per_epoch": draws[(w, h)]}
            for w, h in sorted(images, key=lambda s: (s[0] / s[1], s[0]))]


def aspect_error(placements: list[Placement]) -> float:
    """Mean absolute difference between each picture's aspect ratio and its bucket's (kohya reports this too)."""
    if not placements:
        return 0.0
    return sum(abs(p.original[0] / p.original[1] - p.bucket[0] / p.bucket[1]) for p in placements) / len(placements)


def format_table(table: list[dict]) -> str:
    """The bucket table as lines for a terminal or the app's log."""
    lines = [f"{'bucket':>11}  {'aspect':>6}  {'images':>6}  {'per epoch':>9}"]
    for row in table:
        size = f"{row['width']}×{row['height']}"
        lines.append(f"{size:>11}  {row['width'] / row['height']:>6.2f}  {row['images']:>6}  {row['per_epoch']:>9}")
    return "\n".join(lines)
