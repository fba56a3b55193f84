"""core.data.images: every odd file a user might drop in loads with the right pixels.

All images are generated here, in tmp_path. Each odd case is one row of a
table: a function that writes the file, and the pixels we expect back
(checked by value, not just "it loaded").
"""

from __future__ import annotations

import io
import itertools
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms, ImageFile, features

from core.data.images import (
    ImageError,
    fit_image,
    load_image,
    to_rgb,
)

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
WHITE, BLACK, GREY = (255, 255, 255), (0, 0, 0), (128, 128, 128)
HAS_AVIF = features.check("avif")


# --------------------------------------------------------------------------
# builders for files Pillow cannot write directly


def png16(pixels: np.ndarray) -> bytes:
    """A 16-bit RGB or RGBA PNG, written by hand: Pillow only writes 16-bit greyscale."""
    height, width, channels = pixels.shape
    rows = b"".join(b"\0" + pixels[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    colour_type = {3: 2, 4: 6}[channels]
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


_D50 = (0.9642, 1.0, 0.8249)
_SRGB_TO_XYZ_D50 = np.array(
    [[0.4360747, 0.3850649, 0.1430804], [0.2225045, 0.7168786, 0.0606169], [0.0139322, 0.0971045, 0.7141733]]
)


def cmyk_icc_profile(ink_to_rgb: Callable[[int, int, int, int], tuple[int, int, int]]) -> bytes:
    """A minimal ICC v2 CMYK profile (A2B0 = lut16, 2-point grid, XYZ PCS).

    No CMYK profile ships on the machine and ImageCms cannot create one, so
    we build one whose corners say which sRGB colour each ink mix prints as.
    """

    def s15(x: float) -> bytes:
        return struct.pack(">i", round(x * 65536))

    clut = []
    for inks in itertools.product((0, 1), repeat=4):  # first channel varies slowest
        xyz = _SRGB_TO_XYZ_D50 @ np.array(ink_to_rgb(*inks), dtype=float)
        clut += [min(65535, round(v * 32768)) for v in xyz]
    identity = b"".join(s15(v) for v in (1, 0, 0, 0, 1, 0, 0, 0, 1))
    lut = b"mft2\0\0\0\0" + bytes([4, 3, 2, 0]) + identity + struct.pack(">HH", 2, 2)
    lut += struct.pack(">8H", *[0, 65535] * 4) + struct.pack(f">{len(clut)}H", *clut)
    lut += struct.pack(">6H", *[0, 65535] * 3)
    wtpt = b"XYZ \0\0\0\0" + b"".join(s15(v) for v in _D50)
    desc = b"desc\0\0\0\0" + struct.pack(">I", 5) + b"test\0" + b"\0" * 78
    tags = [(b"A2B0", lut), (b"wtpt", wtpt), (b"desc", desc)]
    offset = 128 + 4 + 12 * len(tags)
    table = body = b""
    for sig, data in tags:
        data += b"\0" * (-len(data) % 4)
        table += sig + struct.pack(">II", offset + len(body), len(data))
        body += data
    header = struct.pack(">I", offset + len(body)) + b"lcms" + struct.pack(">I", 0x02100000)
    header += b"prtrCMYKXYZ " + b"\0" * 12 + b"acsp" + b"\0" * 28 + b"".join(s15(v) for v in _D50)
    header += b"\0" * (128 - len(header))
    return header + struct.pack(">I", len(tags)) + table + body


def plain_inks(c, m, y, k):
    return ((1 - c) * (1 - k), (1 - m) * (1 - k), (1 - y) * (1 - k))


def swapped_inks(c, m, y, k):
    """Deliberately odd: cyan and magenta inks swapped, so honouring the profile shows."""
    return plain_inks(m, c, y, k)


def halves(mode: str, left, right, size=(32, 16)) -> Image.Image:
    """An image whose left half is ``left`` and right half ``right``."""
    im = Image.new(mode, size, left)
    im.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return im


def noise(size=(64, 64)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def save(im: Image.Image, path: Path, **kw) -> Path:
    im.save(path, **kw)
    return path


# --------------------------------------------------------------------------
# odd images that must load with the right pixels


def cmyk_jpeg(d):
    return save(halves("CMYK", (0, 255, 255, 0), (0, 0, 0, 0)), d / "cmyk.jpg", quality=95)


def cmyk_tiff(d):
    return save(halves("CMYK", (0, 255, 255, 0), (255, 255, 0, 0)), d / "cmyk.tif")


def cmyk_jpeg_with_profile(d):
    im = halves("CMYK", (255, 0, 0, 0), (0, 0, 0, 0))  # cyan ink | paper
    return save(im, d / "cmyk_icc.jpg", quality=95, icc_profile=cmyk_icc_profile(swapped_inks))


def cmyk_jpeg_with_wrong_profile(d):
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()  # RGB profile on CMYK data
    im = halves("CMYK", (0, 255, 255, 0), (0, 0, 0, 0))
    return save(im, d / "cmyk_bad.jpg", quality=95, icc_profile=srgb)


def grey16_png(d):
    values = np.array([[0, 32896, 65535, 2570]], dtype=np.uint16)
    return save(Image.fromarray(values), d / "grey16.png")


def grey16_big_endian_tiff(d):
    values = np.array([[0, 32896, 65535, 2570]], dtype=">u2")
    return save(Image.frombytes("I;16B", (4, 1), values.tobytes()), d / "grey16.tif")


def int32_tiff(d):
    return save(Image.fromarray(np.array([[0, 32896, 65535, 2570]], dtype=np.int32)), d / "int32.tif")


def float_tiff(d):
    values = np.array([[0.0, 128 / 255, 1.0, 10 / 255]], dtype=np.float32)
    return save(Image.fromarray(values), d / "float.tif")


def rgb16_png(d):
    pixels = np.array([[[65535, 0, 0], [0, 65535, 0], [0, 0, 65535], [32896, 32896, 32896], [2570, 0, 0]]])
    path = d / "rgb16.png"
    path.write_bytes(png16(pixels))
    return path


def rgba16_png(d):
    pixels = np.array([[[0, 0, 0, 0], [65535, 0, 0, 65535], [0, 0, 65535, 0]]])
    path = d / "rgba16.png"
    path.write_bytes(png16(pixels))
    return path


def palette_transparent_png(d):
    im = halves("P", 0, 1)
    im.putpalette([0, 0, 0, 0, 255, 0])  # index 0 black (transparent), 1 green
    return save(im, d / "palette.png", transparency=0)


def rgba_png(d):
    im = Image.new("RGBA", (48, 16), (0, 0, 0, 0))  # transparent black
    im.paste((255, 0, 0, 128), (16, 0, 32, 16))  # half-transparent red
    im.paste((0, 0, 255, 255), (32, 0, 48, 16))  # opaque blue
    return save(im, d / "rgba.png")


def la_png(d):
    return save(halves("LA", (0, 0), (50, 255)), d / "la.png")


def rgb_transparent_colour_png(d):
    return save(halves("RGB", BLACK, BLUE), d / "rgb_trns.png", transparency=BLACK)


def grey_transparent_value_png(d):
    return save(halves("L", 0, 90), d / "l_trns.png", transparency=0)


def bilevel_png(d):
    return save(halves("1", 0, 1), d / "bilevel.png")


def lab_tiff(d):
    return save(halves("LAB", (255, 128, 128), (137, 208, 195)), d / "lab.tif")  # white | red


def palette_gif(d):
    im = halves("P", 0, 1)
    im.putpalette([255, 0, 0, 0, 0, 255])
    return save(im, d / "palette.gif")


def transparent_gif(d):
    im = halves("P", 0, 1)
    im.putpalette([0, 0, 0, 0, 0, 255])
    return save(im, d / "transparent.gif", transparency=0)


def animated_gif(d):
    frames = [Image.new("RGB", (16, 16), c) for c in (RED, GREEN, BLUE)]
    return save(frames[0], d / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)


def animated_webp(d):
    frames = [Image.new("RGB", (16, 16), c) for c in (RED, GREEN, BLUE)]
    path = d / "anim.webp"
    return save(frames[0], path, save_all=True, append_images=frames[1:], duration=50, lossless=True)


def webp_lossless(d):
    return save(halves("RGBA", (255, 0, 0, 255), (0, 0, 0, 0)), d / "x.webp", lossless=True)


def avif(d):
    return save(halves("RGB", RED, BLUE, size=(64, 32)), d / "x.avif", quality=95, subsampling="4:4:4")


def png_named_jpg(d):
    return save(halves("RGB", RED, BLUE), d / "really_a_png.jpg", format="PNG")


def jpeg_named_png(d):
    return save(halves("RGB", RED, BLUE), d / "really_a_jpeg.png", format="JPEG", quality=95)


def non_ascii_name(d):
    return save(halves("RGB", RED, BLUE), d / "ça va 猫.png")


def ycbcr_jpeg(d):
    return save(halves("YCbCr", (76, 85, 255), (255, 128, 128)), d / "ycbcr.jpg", quality=95)


@dataclass
class Case:
    make: Callable[[Path], Path]
    pixels: dict[tuple[int, int], tuple[int, int, int]]  # (x, y) -> expected RGB
    tol: int = 0
    marks: list = field(default_factory=list)


LEFT, RIGHT = (4, 8), (28, 8)  # centres of the two halves of a 32x16 `halves` image
LOAD_CASES = {
    "cmyk_jpeg": Case(cmyk_jpeg, {LEFT: RED, RIGHT: WHITE}, tol=6),
    "cmyk_tiff": Case(cmyk_tiff, {LEFT: RED, RIGHT: BLUE}),
    "cmyk_jpeg_icc_profile_applied": Case(cmyk_jpeg_with_profile, {LEFT: (255, 0, 255), RIGHT: WHITE}, tol=8),
    "cmyk_jpeg_wrong_profile_falls_back": Case(
        cmyk_jpeg_with_wrong_profile, {LEFT: RED, RIGHT: WHITE}, tol=6
    ),
    "grey16_png_scaled_not_clipped": Case(
        grey16_png, {(0, 0): BLACK, (1, 0): GREY, (2, 0): WHITE, (3, 0): (10, 10, 10)}
    ),
    "grey16_big_endian_tiff": Case(grey16_big_endian_tiff, {(0, 0): BLACK, (1, 0): GREY, (2, 0): WHITE}),
    "int32_tiff": Case(int32_tiff, {(0, 0): BLACK, (1, 0): GREY, (2, 0): WHITE, (3, 0): (10, 10, 10)}),
    "float_tiff_0_to_1": Case(float_tiff, {(0, 0): BLACK, (1, 0): GREY, (2, 0): WHITE, (3, 0): (10, 10, 10)}),
    "rgb16_png": Case(
        rgb16_png, {(0, 0): RED, (1, 0): GREEN, (2, 0): BLUE, (3, 0): GREY, (4, 0): (10, 0, 0)}
    ),
    "rgba16_png": Case(rgba16_png, {(0, 0): WHITE, (1, 0): RED, (2, 0): WHITE}),
    "palette_png_transparent_index": Case(palette_transparent_png, {LEFT: WHITE, RIGHT: GREEN}),
    "rgba_png": Case(rgba_png, {(8, 8): WHITE, (24, 8): (255, 127, 127), (40, 8): BLUE}, tol=1),
    "la_png": Case(la_png, {LEFT: WHITE, RIGHT: (50, 50, 50)}),
    "rgb_png_transparent_colour": Case(rgb_transparent_colour_png, {LEFT: WHITE, RIGHT: BLUE}),
    "grey_png_transparent_value": Case(grey_transparent_value_png, {LEFT: WHITE, RIGHT: (90, 90, 90)}),
    "bilevel_png": Case(bilevel_png, {LEFT: BLACK, RIGHT: WHITE}),
    "lab_tiff": Case(lab_tiff, {LEFT: WHITE, RIGHT: (250, 5, 11)}, tol=3),
    "ycbcr_jpeg": Case(ycbcr_jpeg, {LEFT: RED, RIGHT: WHITE}, tol=6),
    "palette_gif": Case(palette_gif, {LEFT: RED, RIGHT: BLUE}),
    "transparent_gif": Case(transparent_gif, {LEFT: WHITE, RIGHT: BLUE}),
    "animated_gif_first_frame": Case(animated_gif, {(8, 8): RED}),
    "animated_webp_first_frame": Case(animated_webp, {(8, 8): RED}),
    "webp_lossless_with_alpha": Case(webp_lossless, {LEFT: RED, RIGHT: WHITE}),
    "avif": Case(
        avif,
        {(8, 16): RED, (56, 16): BLUE},
        tol=10,
        marks=[pytest.mark.skipif(not HAS_AVIF, reason="this Pillow has no AVIF support")],
    ),
    "png_named_jpg": Case(png_named_jpg, {LEFT: RED, RIGHT: BLUE}),
    "jpeg_named_png": Case(jpeg_named_png, {LEFT: RED, RIGHT: BLUE}, tol=6),
    "non_ascii_file_name": Case(non_ascii_name, {LEFT: RED, RIGHT: BLUE}),
}


def assert_pixels(im: Image.Image, expected: dict, tol: int) -> None:
    for (x, y), want in expected.items():
        got = im.getpixel((x, y))
        assert all(abs(g - w) <= tol for g, w in zip(got, want, strict=True)), f"pixel {(x, y)}: got {got}, want {want}"


@pytest.mark.parametrize(
    "case", [pytest.param(c, id=name, marks=c.marks) for name, c in LOAD_CASES.items()]
)
def test_odd_image_loads_as_8bit_rgb_with_right_pixels(case: Case, tmp_path):
    im = load_image(case.make(tmp_path))
    assert im.mode == "RGB"
    assert_pixels(im, case.pixels, case.tol)


def test_cmyk_profile_that_does_not_fit_is_logged(tmp_path, caplog):
    load_image(cmyk_jpeg_with_wrong_profile(tmp_path))
    assert "ICC profile could not be applied" in caplog.text


def test_plain_convert_really_clips_16bit(tmp_path):
    """Guards the reason for our own scaling: if Pillow ever fixes this, simplify."""
    with Image.open(grey16_png(tmp_path)) as im:
        assert im.convert("L").getpixel((1, 0)) == 255  # 32896 clipped, not scaled to 128


# --------------------------------------------------------------------------
# EXIF orientation


@pytest.mark.parametrize(
    "orientation, red_corner",
    [(1, "top_left"), (6, "top_right"), (8, "bottom_left"), (3, "bottom_right")],
)
def test_exif_orientation_is_applied(orientation, red_corner, tmp_path):
    stored = Image.new("RGB", (48, 24), WHITE)
    stored.paste(RED, (0, 0, 12, 12))  # marker in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = orientation
    im = load_image(save(stored, tmp_path / "photo.jpg", exif=exif, quality=95))

    w, h = im.size
    assert (w, h) == ((24, 48) if orientation in (6, 8) else (48, 24))
    corners = {
        "top_left": (3, 3),
        "top_right": (w - 4, 3),
        "bottom_left": (3, h - 4),
        "bottom_right": (w - 4, h - 4),
    }
    for name, xy in corners.items():
        assert_pixels(im, {xy: RED if name == red_corner else WHITE}, tol=8)


# --------------------------------------------------------------------------
# files that must fail with a reason a user understands


def truncated(fmt: str, keep: float):
    def make(d):
        data = io.BytesIO()
        noise().save(data, fmt)
        path = d / f"cut.{fmt.lower()}"
        path.write_bytes(data.getvalue()[: int(len(data.getvalue()) * keep)])
        return path

    return make


def empty(d):
    (d / "empty.png").touch()
    return d / "empty.png"


def text_named_png(d):
    (d / "notes.png").write_text("these are my captions, not an image\n")
    return d / "notes.png"


def heic_we_cannot_read(d):
    (d / "IMG_0001.HEIC").write_bytes(b"\0\0\0\x18ftypheic" + b"\0" * 64)
    return d / "IMG_0001.HEIC"


def missing(d):
    return d / "gone.png"


def folder(d):
    (d / "folder.png").mkdir()
    return d / "folder.png"


ERROR_CASES = {
    "truncated_png": (truncated("PNG", 0.5), "image file is truncated"),
    "truncated_png_near_end": (truncated("PNG", 0.98), "image file is truncated"),
    "truncated_jpeg": (truncated("JPEG", 0.5), "image file is truncated"),
    "truncated_jpeg_in_header": (truncated("JPEG", 0.1), "image file is truncated"),
    "truncated_tiff": (truncated("TIFF", 0.5), "image file is truncated"),
    "empty_file": (empty, "file is empty (0 bytes)"),
    "text_named_png": (text_named_png, "not an image (Pillow cannot identify it)"),
    "heic_without_plugin": (heic_we_cannot_read, "pillow-heif"),
    "missing_file": (missing, "file not found"),
    "folder": (folder, "is a folder"),
}


@pytest.mark.parametrize("make, reason", ERROR_CASES.values(), ids=ERROR_CASES.keys())
def test_bad_file_raises_image_error_with_reason(make, reason, tmp_path):
    path = make(tmp_path)
    with pytest.raises(ImageError) as info:
        load_image(path)
    assert reason in info.value.reason
    assert info.value.path == str(path)
    assert str(info.value) == f"{path}: {info.value.reason}"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # never "fixed" by turning the check off


def test_decompression_bomb_is_too_large(tmp_path, monkeypatch):
    path = save(Image.new("RGB", (100, 100)), tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageError, match=r"image is too large \(10,000 pixels; limit 2,000\)"):
        load_image(path)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to count open files")
def test_no_file_handles_left_open(tmp_path):
    paths = [make(tmp_path) for make, _ in ERROR_CASES.values()]
    paths += [cmyk_jpeg(tmp_path), animated_gif(tmp_path), rgba_png(tmp_path)]
    before = len(os.listdir("/proc/self/fd"))
    for path in paths * 3:
        try:
            load_image(path)
        except ImageError:
            pass
    assert len(os.listdir("/proc/self/fd")) == before


def test_huge_image_loads_and_fits_down(tmp_path):
    path = save(Image.new("RGB", (6000, 5000), (10, 200, 30)), tmp_path / "huge.png", compress_level=1)
    im = load_image(path)
    assert im.size == (6000, 5000)
    fitted, (top, left) = fit_image(im, 512, 512)
    assert fitted.size == (512, 512)
    assert (top, left) == (0, (614 - 512) // 2)
    assert_pixels(fitted, {(0, 0): (10, 200, 30), (511, 511): (10, 200, 30)}, tol=1)


# --------------------------------------------------------------------------
# to_rgb on in-memory modes that files rarely carry


def make_mode(mode: str, values) -> Image.Image:
    im = Image.new(mode, (len(values), 1))
    for x, v in enumerate(values):
        im.putpixel((x, 0), v)
    return im


MODE_CASES = {
    "hsv": (lambda: make_mode("HSV", [(0, 255, 255), (85, 255, 255)]), [RED, GREEN], 1),
    "ycbcr": (lambda: make_mode("YCbCr", [(76, 85, 255), (255, 128, 128)]), [RED, WHITE], 2),
    "premultiplied_rgba": (lambda: make_mode("RGBa", [(0, 0, 0, 0), (0, 0, 255, 255)]), [WHITE, BLUE], 0),
    "premultiplied_la": (lambda: make_mode("La", [(0, 0), (50, 255)]), [WHITE, (50, 50, 50)], 0),
    "grey16_little_endian": (lambda: make_mode("I;16L", [0, 32896, 65535]), [BLACK, GREY, WHITE], 0),
    "float_0_to_255": (lambda: make_mode("F", [0.0, 128.0, 300.0]), [BLACK, (109, 109, 109), WHITE], 0),
    "float_nan": (lambda: make_mode("F", [float("nan"), 1.0]), [BLACK, WHITE], 0),
    "palette_rgba": (
        lambda: Image.new("RGBA", (2, 1), (0, 0, 255, 0)).quantize(method=Image.Quantize.FASTOCTREE),
        [WHITE, WHITE],
        0,
    ),
}


@pytest.mark.parametrize("make, expected, tol", MODE_CASES.values(), ids=MODE_CASES.keys())
def test_to_rgb_mode(make, expected, tol):
    im = to_rgb(make())
    assert im.mode == "RGB"
    assert_pixels(im, {(x, 0): want for x, want in enumerate(expected)}, tol)
