"""Loss masks (``dataset.masked_loss``): a picture's ``NAME.mask.png`` beside it, else its transparency."""

from __future__ import annotations

import os
import struct
from pathlib import Path

from PIL import Image, ImageOps

from core.data.images import MAX_PIXELS, ImageError, _decode_reason, _open_file, _too_many_pixels, load_image

MASK_SUFFIX = ".mask.png"


def mask_path(picture: str | os.PathLike) -> Path:
    """Where a picture's loss mask file is: beside it, ``NAME.mask.png`` (white trains, black does not)."""
    picture = Path(picture)
    return picture.with_name(picture.stem + MASK_SUFFIX)


def is_mask_file(path: str | os.PathLike) -> bool:
    return Path(path).name.lower().endswith(MASK_SUFFIX)


def load_mask(path: str | os.PathLike, size: tuple[int, int] | None = None) -> Image.Image | None:
    """A picture's loss mask as upright 8-bit greyscale at the picture's size (255: trained fully, 0: not at
    all): its ``NAME.mask.png``, else its transparency (alpha band or transparent palette entries); None when
    it has neither. ``size``: the picture's upright size, when known. Raises ``ImageError`` for a mask file
    that cannot be read."""
    file = mask_path(path)
    if file.is_file():
        if size is None:
            with load_image(path, max_side=64) as picture:
                size = picture.info["original_size"]
        with load_image(file) as mask:
            mask = mask.convert("L")
        return mask if mask.size == size else mask.resize(size, Image.Resampling.BILINEAR)
    with _open_file(path) as f:
        try:
            with Image.open(f) as im:
                if not im.has_transparency_data:
                    return None
                if im.size[0] * im.size[1] > MAX_PIXELS:
                    raise ImageError(path, _too_many_pixels(im.size[0] * im.size[1]))
                im.load()
                ImageOps.exif_transpose(im, in_place=True)
                return (im.convert("LA") if im.mode == "La" else im).convert("RGBA").getchannel("A")
        except (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError) as e:
            raise ImageError(path, _decode_reason(e)) from e
