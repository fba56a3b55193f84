"""Loading the images a user drops in, and preparing them for training.

Users bring whatever their phone, scanner or browser produced: CMYK JPEGs,
16-bit PNGs, palette GIFs with a transparent index, photos stored sideways
with an EXIF orientation flag, half-downloaded files. Pillow opens them all,
but its defaults get several of them silently wrong (16-bit greyscale is
clipped to white, transparent pixels come out black, sideways photos stay
sideways), and a broken file only fails when its pixels are first used, deep
inside a training step. ``load_image`` decodes everything up front and
returns plain 8-bit RGB, or raises ``ImageError`` saying what is wrong with
which file.

Pillow is imported at module level (it is cheap); torch only inside the
functions that need it, so importing this module stays fast.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import logging
import math
import os
import re
import struct
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageCms, ImageFile, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# Pillow's greyscale modes with more than 8 bits per pixel.
_DEEP_GREY_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
# Formats Pillow registers but cannot decode: write-only (PDF, Palm) and
# identify-only (MPEG video: size only, no pixels).
_UNDECODABLE_FORMATS = frozenset({"PDF", "PALM", "MPEG"})
# Extensions Pillow has no decoder for, with what the user can do about it.
_UNSUPPORTED_HINTS = {
    ".heic": "HEIC photos need the pillow-heif package, or export them as JPEG",
    ".heif": "HEIF photos need the pillow-heif package, or export them as JPEG",
    ".svg": "SVG is a vector format; export it as PNG first",
    ".jxl": "JPEG XL needs a Pillow plugin (pillow-jxl-plugin), or export it as PNG or JPEG",
    **{ext: "a camera RAW file needs developing first: export it as JPEG or PNG"
       for ext in (".cr2", ".cr3", ".nef", ".nrw", ".arw", ".dng", ".raf", ".orf", ".rw2", ".pef", ".srw")},
}
_DIGEST_CHUNK = 1 << 20
# No picture for training needs more than this; past it (a 14,000-pixel square) decoding alone takes
# gigabytes, so the file is refused with its size rather than decoded.
MAX_PIXELS = 200_000_000
# Above this a picture is decoded at reduced size when the caller needs less (a JPEG straight from the
# file at 1/2, 1/4 or 1/8 scale, other formats reduced right after decoding), so every copy made after
# (orientation, colour conversion) is small. Below it nothing changes: the same pixels as always.
LARGE_PIXELS = 40_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS  # Pillow's own bomb check: it refuses twice this before reading pixels
_ORIENTATION = 0x0112
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}


class ImageError(Exception):
    """An image file that cannot be used, with a reason a user understands."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


# --------------------------------------------------------------------------
# file extensions


@functools.cache
def image_extensions() -> frozenset[str]:
    """Lower-case extensions (".png", ".jpg", ...) that this Pillow can open.

    Computed on first use: it makes Pillow import all its format plugins.
    Dropped: formats Pillow cannot decode, and "stub" formats (BUFR, GRIB,
    HDF5, WMF/EMF off Windows) that need a handler no one installs. Kept:
    ``.mpo`` (iPhone/camera multi-picture JPEG), which the JPEG plugin opens.
    """
    return frozenset(
        ext.lower()
        for ext, fmt in Image.registered_extensions().items()
        if fmt == "MPO" or (fmt in Image.OPEN and fmt not in _UNDECODABLE_FORMATS and not _is_stub(fmt))
    )


def _is_stub(fmt: str) -> bool:
    """True for Pillow formats that identify files but decode only via a plugin handler."""
    factory = Image.OPEN[fmt][0]
    return isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile)


def __getattr__(name: str):
    """Provide ``IMAGE_EXTENSIONS`` lazily, so importing the module does no work."""
    if name == "IMAGE_EXTENSIONS":
        return image_extensions()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def looks_like_picture(path: str | os.PathLike) -> bool:
    """An extension of a picture format, readable here or not (HEIC, SVG, camera RAW): worth a reason when
    it cannot be used, where other files are simply not pictures."""
    return is_image_extension(path) or Path(path).suffix.lower() in _UNSUPPORTED_HINTS


def is_image_extension(path: str | os.PathLike) -> bool:
    """True if the file's extension is one Pillow can open (case-insensitive).

    This only filters a folder listing; ``load_image`` still detects the
    format from the file's content.
    """
    return Path(path).suffix.lower() in image_extensions()


# --------------------------------------------------------------------------
# loading


def load_image(path: str | os.PathLike, max_side: int | None = None) -> Image.Image:
    """Decode ``path`` fully into an upright 8-bit RGB image.

    The format is detected from the content, not the extension. Every pixel
    is decoded here (``.load()``), so a truncated file fails now, with its
    name, and not later in a data-loader worker. Raises ``ImageError``.

    ``max_side``: the caller needs no more than this many pixels on the
    picture's short side. A picture over ``LARGE_PIXELS`` is then decoded
    reduced (its short side never below ``max_side``, so a crop to any size
    up to that still fits); ``image.info["original_size"]`` always holds the
    upright size of the picture in the file. Pictures over ``MAX_PIXELS`` are
    refused.
    """
    with _open_file(path) as f:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit says it better
                im = Image.open(f)
            with im:
                width, height = im.size
                if width * height > MAX_PIXELS:
                    raise ImageError(path, _too_many_pixels(width * height))
                large = max_side is not None and width * height > LARGE_PIXELS
                if large:
                    return _load_reduced(im, max_side)
                im.load()  # the first frame of an animation
                # In place: we own `im`, and a big photo is not copied for nothing.
                ImageOps.exif_transpose(im, in_place=True)
                rgb = to_rgb(im)
                rgb.info["original_size"] = rgb.size
                return rgb
        except Image.DecompressionBombError as e:
            raise ImageError(path, _too_large_reason(e)) from e
        except UnidentifiedImageError as e:
            raise ImageError(path, _unidentified_reason(path)) from e
        except (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError) as e:
            # Pillow's decoders signal damaged data with any of these.
            raise ImageError(path, _decode_reason(e)) from e
        except MemoryError as e:
            # A damaged or hostile header (JPEG 2000, TIFF) can ask for more memory than any picture needs.
            raise ImageError(path, "the file asks for more memory than a picture of its size needs (a damaged "
                                   "or hostile header); re-export it") from e
        except Exception as e:  # noqa: BLE001 - any other decoder failure is this file's problem, not a crash
            raise ImageError(path, _decode_reason(e)) from e


def _load_reduced(im: Image.Image, max_side: int) -> Image.Image:
    """A large picture decoded at the smallest size that keeps ``max_side`` pixels on its short side."""
    width, height = im.size
    orientation = im.getexif().get(_ORIENTATION, 1)
    scale = max_side / min(width, height)
    if scale < 1:
        # JPEG: the decoder itself scales by 1/2, 1/4 or 1/8 (at least the requested size); others ignore it.
        im.draft(None, (math.ceil(width * scale), math.ceil(height * scale)))
    im.load()
    factor = min(im.size) // max_side
    if factor >= 2:
        with contextlib.suppress(ValueError):  # modes reduce() does not know keep their decoded size
            im = im.reduce(factor)
    if orientation in _TRANSPOSE:
        im = im.transpose(_TRANSPOSE[orientation])
    rgb = to_rgb(im)
    rgb.info["original_size"] = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
    return rgb


def _too_many_pixels(pixels: int, limit: int = MAX_PIXELS) -> str:
    return (f"image is too large ({pixels:,} pixels; limit {limit:,}): scale it down (training uses 1 to 4 "
            f"megapixels)")


def _open_file(path: str | os.PathLike):
    """Open ``path`` for reading, turning OS errors into ImageErrors.

    We hand Pillow an open file (not the path) so that we, not Pillow,
    decide when it is closed: the ``with`` in ``load_image`` closes it on
    every path, errors included, and no ResourceWarning leaks.
    """
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed by the caller's with
    except FileNotFoundError as e:
        raise ImageError(path, "file not found") from e
    except IsADirectoryError as e:
        raise ImageError(path, "is a folder, not an image file") from e
    except PermissionError as e:
        raise ImageError(path, "permission denied (cannot read the file)") from e
    except OSError as e:
        raise ImageError(path, f"cannot open the file ({e.strerror or e})") from e
    if os.fstat(f.fileno()).st_size == 0:
        f.close()
        raise ImageError(path, "file is empty (0 bytes)")
    return f


def _too_large_reason(error: Exception) -> str:
    """Say how big the image is and what the limit is.

    Pillow refuses images over twice ``Image.MAX_IMAGE_PIXELS`` (a guard
    against decompression bombs) before decoding anything, so the pixel
    count is only in its message.
    """
    limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)  # the error is only raised while a limit is set
    found = re.search(r"\((\d+) pixels\)", str(error))
    if found:
        return _too_many_pixels(int(found.group(1)), limit)
    return f"image is too large (limit {limit:,} pixels): scale it down"


def _unidentified_reason(path: str | os.PathLike) -> str:
    """Explain a file Pillow does not recognise, with a hint for known formats."""
    hint = _UNSUPPORTED_HINTS.get(Path(path).suffix.lower())
    reason = "not an image (Pillow cannot identify it)"
    return f"{reason}; {hint}" if hint else reason


def _decode_reason(error: Exception) -> str:
    """Turn a decoder exception into a reason, recognising truncated files.

    Truncation shows up as OSError("image file is truncated ..."),
    OSError("Truncated File Read"), SyntaxError("... Truncated data") or
    EOFError, depending on the format and where the file was cut.
    """
    detail = str(error) or type(error).__name__
    if isinstance(error, EOFError) or "truncated" in detail.lower():
        # Pillow's own text often says "image file is truncated" already; don't say it twice.
        extra = "" if detail.lower().startswith("image file is truncated") else f" ({detail})"
        return f"image file is truncated: the data ends early{extra}; re-download or re-export it"
    return f"cannot decode the image data ({type(error).__name__}: {detail})"


# --------------------------------------------------------------------------
# mode conversion


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert an image of any Pillow mode to 8-bit RGB, correctly.

    Plain ``image.convert("RGB")`` is wrong for several modes: it clips
    16-bit and float greyscale instead of scaling, drops alpha so that
    transparent pixels show whatever colour they happen to hold (often
    black), and ignores a CMYK image's ICC profile. Always returns a new
    image.
    """
    if image.mode in _DEEP_GREY_MODES:
        return _deep_grey_to_l(image).convert("RGB")
    if image.mode == "F":
        return _float_to_l(image).convert("RGB")
    if image.mode == "CMYK":
        return _cmyk_to_rgb(image)
    if image.has_transparency_data:  # alpha band, "transparency" info, or RGBA palette
        return _flatten_on_white(image)
    # 1, L, P, RGB, YCbCr, LAB, HSV: Pillow's own conversions are right.
    return image.convert("RGB")


def _deep_grey_to_l(image: Image.Image) -> Image.Image:
    """Scale 16-bit (or 32-bit int) greyscale to 8 bits by value range.

    Pillow's convert("L") clips at 255, so every value of a 16-bit image
    above 255 (nearly all of it) would turn white. 16-bit data maps
    0..65535 onto 0..255; int32 data wider than that is scaled by its max.
    """
    values = np.asarray(image).astype(np.float64)
    values = np.clip(values, 0, None)
    top = max(65535.0, float(values.max(initial=0)))
    return _to_l(values * (255.0 / top))


def _float_to_l(image: Image.Image) -> Image.Image:
    """Scale 32-bit float greyscale to 8 bits by its range.

    Pillow's convert("L") truncates floats, so a 0..1 image (the usual
    convention) becomes 0 and 1 out of 255: black. 0..1 maps to 0..255;
    data already in 0..255 is kept; anything larger is scaled by its max.
    """
    values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    top = float(values.max(initial=0))
    if top <= 1.0:
        values = values * 255.0
    elif top > 255.0:
        values = values * (255.0 / top)
    return _to_l(values)


def _to_l(values: np.ndarray) -> Image.Image:
    """Round 0..255 floats into an 8-bit "L" image."""
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))


def _cmyk_to_rgb(image: Image.Image) -> Image.Image:
    """Convert CMYK to RGB through the embedded ICC profile when there is one.

    Print CMYK only looks right through its profile; Pillow's plain
    convert uses a naive formula that gives dull, shifted colours. A
    broken or mismatched profile falls back to that formula with a log
    line, since a usable image beats an error here.
    """
    icc = image.info.get("icc_profile")
    if icc:
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            srgb = ImageCms.createProfile("sRGB")
            return ImageCms.profileToProfile(image, source, srgb, outputMode="RGB")
        except (ImageCms.PyCMSError, OSError, ValueError) as e:
            log.warning("CMYK ICC profile could not be applied (%s); using a plain conversion", e)
    return image.convert("RGB")


def _flatten_on_white(image: Image.Image) -> Image.Image:
    """Composite an image with transparency onto a white background.

    Covers alpha bands (RGBA, LA, PA and premultiplied RGBa, La), palettes
    with alpha, and the ``transparency`` entry of P, L and RGB images (a
    transparent palette index or colour). Dropping alpha instead
    would expose the colour stored under transparent pixels, usually black.
    """
    if image.mode == "La":  # Pillow cannot go from premultiplied La to RGBA directly
        image = image.convert("LA")
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


# --------------------------------------------------------------------------
# preparing for training


def fit_image(
    image: Image.Image, width: int, height: int, no_upscale: bool = False, crop: tuple[int, int] | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """Resize to cover ``width``×``height`` keeping aspect, then center-crop (or crop at ``crop``, (top, left)
    in the resized picture's pixels, for a random crop).

    Returns the image and ``(crop_top, crop_left)`` in the resized image's
    pixels: SDXL is conditioned on these offsets. With ``no_upscale`` an
    image smaller than the target raises ValueError instead of being
    enlarged (blurry upscales teach the model blur).
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"target size must be positive, got {width}x{height}")
    src_w, src_h = image.size
    if no_upscale and (src_w < width or src_h < height):
        raise ValueError(
            f"image is {src_w}x{src_h}, smaller than the {width}x{height} target, and no_upscale is set"
        )
    new_w, new_h = cover_size(src_w, src_h, width, height)
    top, left = crop if crop is not None else ((new_h - height) // 2, (new_w - width) // 2)
    if (new_w, new_h) == image.size:
        return image.crop((left, top, left + width, top + height)), (top, left)
    # Resample only the part of the source that survives the crop (``box``),
    # straight to the target size: the same pixels as resizing everything and
    # cropping, without building a huge intermediate for a long strip.
    # reducing_gap first shrinks by a whole factor with a cheap box filter,
    # then LANCZOS does the rest: several times faster on big photos, and
    # visually the same at a gap of 3.
    sx, sy = new_w / src_w, new_h / src_h
    box = (left / sx, top / sy, (left + width) / sx, (top + height) / sy)
    return image.resize((width, height), Image.Resampling.LANCZOS, box=box, reducing_gap=3.0), (top, left)


def jitter_colour(image: Image.Image, brightness: float = 1.0, contrast: float = 1.0, saturation: float = 1.0,
                  hue: float = 0.0) -> Image.Image:
    """An RGB picture with its brightness, contrast and saturation scaled by the factors and its hue turned by
    ``hue`` of the colour circle (Pillow's enhancers and its HSV mode)."""
    from PIL import ImageEnhance

    for enhancer, factor in ((ImageEnhance.Brightness, brightness), (ImageEnhance.Contrast, contrast),
                             (ImageEnhance.Color, saturation)):
        if factor != 1.0:
            image = enhancer(image).enhance(factor)
    if hue:
        h, s, v = image.convert("HSV").split()
        shift = round(hue * 256) % 256
        h = h.point(lambda value: (value + shift) % 256)
        image = Image.merge("HSV", (h, s, v)).convert("RGB")
    return image


def cover_size(src_w: int, src_h: int, width: int, height: int) -> tuple[int, int]:
    """The smallest aspect-keeping size that covers width×height.

    The side that is short relative to the target is matched exactly; the
    other is rounded but never below the target, so the crop always fits.
    """
    if src_w * height >= src_h * width:  # wider than the target: match height
        return max(width, round(src_w * height / src_h)), height
    return width, max(height, round(src_h * width / src_w))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image as a float32 (3, H, W) tensor in [-1, 1], the VAE's input range."""
    import torch

    if image.mode != "RGB":
        raise ValueError(f"to_tensor expects an RGB image, got mode {image.mode!r}; use load_image/to_rgb")
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8))
    return pixels.permute(2, 0, 1).float().div_(127.5).sub_(1.0).contiguous()


def from_tensor(tensor: torch.Tensor) -> Image.Image:
    """Inverse of ``to_tensor``: a (3, H, W) tensor in [-1, 1] to an RGB image.

    Values outside [-1, 1] are clipped; a leading batch dimension of 1 is
    accepted, since decoded VAE output usually has one.
    """
    import torch

    t = tensor.detach().to("cpu", dtype=torch.float32)
    if t.dim() == 4 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 3 or t.shape[0] != 3:
        raise ValueError(f"from_tensor expects shape (3, H, W), got {tuple(tensor.shape)}")
    pixels = ((t.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy())


# --------------------------------------------------------------------------
# cache keys


def dhash(image: Image.Image) -> int:
    """64-bit difference hash: greyscale 9×8, one bit per "brighter than its right neighbour".

    Re-encodes, resizes and small brightness changes move it by a few bits;
    unrelated pictures differ in about half of them.
    """
    pixels = np.asarray(image.convert("L").resize((9, 8), Image.Resampling.LANCZOS), dtype=np.int16)
    bits = (pixels[:, :-1] > pixels[:, 1:]).flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of the file's bytes, used as a cache key.

    Read in 1 MiB chunks so a large image never sits in memory twice.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_DIGEST_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
