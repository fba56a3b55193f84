"""One draw of a picture as the VAE gets it: resized and cropped to its bucket (at a random place with
``dataset.random_crop``), colour-jittered, mirrored; and its loss mask cropped the same way."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from core.data.buckets import Placement
from core.data.dataset import ImageItem


@dataclass(frozen=True)
class PixelAugment:
    """How one draw of a picture is changed before the VAE (uncached latents only): where the crop sits in the
    resized picture's slack (fractions; None: the centre) and its colour factors."""

    crop: tuple[float, float] | None = None  # (down, across), each 0..1
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0
    hue: float = 0.0

    def placed(self, placement: Placement) -> Placement:
        """The placement with this draw's crop."""
        if self.crop is None:
            return placement
        slack_h = placement.resized[1] - placement.bucket[1]
        slack_w = placement.resized[0] - placement.bucket[0]
        return dataclasses.replace(placement, crop=(round(self.crop[0] * slack_h), round(self.crop[1] * slack_w)))


def load_pixels(path: Path, placement: Placement, flipped: bool, augment: PixelAugment | None = None
                 ) -> torch.Tensor:
    from PIL import Image

    from core.data.images import fit_image, jitter_colour, load_image, to_tensor

    crop = None
    if augment is not None and augment.crop is not None:
        placement = augment.placed(placement)
        crop = placement.crop
    # A giant picture is decoded at twice the bucket's size (enough to cover it at any aspect), not in full.
    with load_image(path, max_side=2 * max(placement.bucket)) as image:
        fitted_image = fit_image(image, *placement.bucket, crop=scaled_crop(image, placement, crop))[0]
    if augment is not None:
        fitted_image = jitter_colour(fitted_image, augment.brightness, augment.contrast, augment.saturation,
                                     augment.hue)
    if flipped:
        fitted_image = fitted_image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_tensor(fitted_image)


def scaled_crop(image, placement: Placement, crop: tuple[int, int] | None) -> tuple[int, int] | None:
    """A crop given in the placement's resized pixels, for this decoded picture (a giant one decoded reduced
    covers the bucket at a slightly different size): kept within its slack."""
    if crop is None:
        return None
    from core.data.images import cover_size

    width, height = cover_size(*image.size, *placement.bucket)
    return (max(0, min(crop[0], height - placement.bucket[1])), max(0, min(crop[1], width - placement.bucket[0])))


def load_loss_mask(item: ImageItem, placement: Placement) -> torch.Tensor:
    """A picture's loss weights in [0, 1] at an eighth of its bucket (the VAE's latent grid), cropped as the
    picture is; all ones for a picture without a mask (core.data.images.load_mask)."""
    from core.data.images import fit_image
    from core.data.masks import load_mask

    width, height = placement.bucket
    mask = load_mask(item.path, item.size)
    if mask is None:
        return torch.ones(1, height // 8, width // 8)
    with mask:
        fitted_mask = fit_image(mask, width, height, crop=scaled_crop(mask, placement, placement.crop))[0]
    values = torch.from_numpy(np.asarray(fitted_mask, dtype=np.float32) / 255.0)[None, None]
    return torch.nn.functional.interpolate(values, size=(height // 8, width // 8), mode="area")[0]


def mask_loader(item: ImageItem, placement: Placement) -> Callable[..., torch.Tensor]:
    """(flipped, the draw's placement) -> its mask: the picture's own placement loaded once (a few kilobytes at
    latent size), a random crop's loaded for that draw; mirrored for flipped draws."""
    held: list[torch.Tensor] = []

    def get(flipped: bool, draw: Placement | None = None) -> torch.Tensor:
        if draw is not None and draw != placement:
            mask = load_loss_mask(item, draw)
        else:
            if not held:
                held.append(load_loss_mask(item, placement))
            mask = held[0]
        return mask.flip(-1) if flipped else mask
    return get


def pixels_loader(path: Path, placement: Placement) -> Callable[..., torch.Tensor]:
    return lambda flipped, augment=None: load_pixels(path, placement, flipped, augment)
