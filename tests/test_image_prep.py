"""core.data.images: extensions, fitting to the training size, tensors and digests."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.data import images
from core.data.images import file_digest, fit_image, from_tensor, is_image_extension, to_tensor
from tests.test_images import HAS_AVIF, WHITE, noise

# --------------------------------------------------------------------------
# extensions


@pytest.mark.parametrize(
    "name, expected",
    [
        ("a.png", True), ("B.JPG", True), ("c.jpeg", True), ("d.webp", True), ("e.tif", True),
        ("f.gif", True), ("g.mpo", True), ("caption.txt", False), ("doc.pdf", False),
        ("clip.mpg", False), ("noext", False), ("archive.png.zip", False),
    ],
)
def test_is_image_extension(name, expected):
    assert is_image_extension(name) is expected


def test_image_extensions_set():
    exts = images.IMAGE_EXTENSIONS
    assert isinstance(exts, frozenset)
    assert {".png", ".jpg", ".jpeg", ".webp"} <= exts
    assert all(e == e.lower() and e.startswith(".") for e in exts)
    assert (".avif" in exts) == HAS_AVIF


def test_import_is_cheap():
    """Importing core.data.images must not pull in torch (the UI imports it early)."""
    code = "import sys, core.data.images; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


# --------------------------------------------------------------------------
# fit_image


@pytest.mark.parametrize(
    "src, target, resized, crop",
    [
        ((200, 100), (64, 64), (128, 64), (0, 32)),  # landscape: height matched, sides cropped
        ((100, 300), (64, 64), (64, 192), (64, 0)),  # portrait: width matched, top/bottom cropped
        ((100, 100), (64, 64), (64, 64), (0, 0)),  # square
        ((100, 100), (96, 64), (96, 96), (16, 0)),  # square into landscape target
        ((640, 480), (512, 512), (683, 512), (0, 85)),  # rounding never goes below the target
        ((30, 20), (64, 64), (96, 64), (0, 16)),  # small image is upscaled by default
        ((1024, 768), (1024, 768), (1024, 768), (0, 0)),  # exact size: no resize
    ],
)
def test_fit_image_size_and_crop(src, target, resized, crop):
    out, (top, left) = fit_image(noise(src), *target)
    assert out.size == target
    assert (top, left) == crop
    assert top == (resized[1] - target[1]) // 2 and left == (resized[0] - target[0]) // 2


def test_fit_image_crops_the_centre():
    src = noise((200, 100))
    out, (top, left) = fit_image(src, 100, 100)  # no resize needed: a pure crop
    assert (top, left) == (0, 50)
    assert np.array_equal(np.asarray(out), np.asarray(src)[:, 50:150])


@pytest.mark.parametrize("src, target", [((100, 50), (64, 64)), ((50, 100), (64, 64)), ((63, 200), (64, 64))])
def test_fit_image_no_upscale_refuses_small_images(src, target):
    with pytest.raises(ValueError, match="smaller than the 64x64 target"):
        fit_image(noise(src), *target, no_upscale=True)


def test_fit_image_no_upscale_accepts_large_enough():
    out, _ = fit_image(noise((64, 200)), 64, 64, no_upscale=True)
    assert out.size == (64, 64)


def test_fit_image_rejects_bad_target():
    with pytest.raises(ValueError, match="positive"):
        fit_image(noise(), 0, 64)


# --------------------------------------------------------------------------
# tensors and digests


def test_to_tensor_shape_dtype_range():
    im = Image.new("RGB", (5, 3), (0, 255, 0))
    t = to_tensor(im)
    assert t.shape == (3, 3, 5) and t.dtype == torch.float32
    assert torch.equal(t[0], torch.full((3, 5), -1.0)) and torch.equal(t[1], torch.ones(3, 5))
    noisy = to_tensor(noise((17, 9)))
    assert noisy.min() >= -1.0 and noisy.max() <= 1.0


def test_tensor_round_trip_is_exact():
    im = noise((31, 17))
    assert np.array_equal(np.asarray(from_tensor(to_tensor(im))), np.asarray(im))
    assert np.array_equal(np.asarray(from_tensor(to_tensor(im)[None])), np.asarray(im))  # batch of 1


def test_from_tensor_clamps_and_checks_shape():
    assert from_tensor(torch.full((3, 2, 2), 5.0)).getpixel((0, 0)) == WHITE
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        from_tensor(torch.zeros(4, 2, 2))


def test_to_tensor_rejects_non_rgb():
    with pytest.raises(ValueError, match="RGB"):
        to_tensor(Image.new("RGBA", (2, 2)))


def test_file_digest_matches_sha256_across_chunks(tmp_path):
    data = os.urandom(3 * (1 << 20) + 123)  # spans several read chunks
    (tmp_path / "x.bin").write_bytes(data)
    assert file_digest(tmp_path / "x.bin") == hashlib.sha256(data).hexdigest()
