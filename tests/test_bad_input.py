"""The remaining holes in what a dataset may hold: links out of the dataset, pictures in formats that cannot be
read, hostile headers, giant captions and giant pictures; and the files the app writes (their permissions)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core import fsutil
from core.data.dataset import MAX_CAPTION_BYTES, read_caption, scan_dataset
from core.data.dataset_store import list_images
from core.data.health import check_dataset
from core.data.images import MAX_PIXELS, ImageError, load_image
from tests.conftest import write_dataset

ROOT = Path(__file__).resolve().parents[1]


def _png(path: Path, size=(80, 96), seed: int = 0) -> Path:
    pixels = (np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype("uint8")
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def linked(tmp_path) -> Path:
    """A dataset with one plain picture and links of every kind."""
    data = tmp_path / "data"
    data.mkdir()
    _png(data / "plain.png")
    (data / "plain.txt").write_text("a plain picture")
    secret = _png(tmp_path / "secret.png", seed=3)
    (data / "outside.png").symlink_to(secret)
    (data / "inside.png").symlink_to(data / "plain.png")
    (data / "dangling.png").symlink_to(tmp_path / "gone.png")
    (data / "loop.png").symlink_to(data / "loop.png")
    (tmp_path / "elsewhere").mkdir()
    _png(tmp_path / "elsewhere" / "far.png", seed=5)
    (data / "folder-link").symlink_to(tmp_path / "elsewhere")
    return data


def test_links_out_of_the_dataset_are_skipped_and_listed(linked):
    scan = scan_dataset(linked)
    assert sorted(item.name for item in scan.items) == ["inside.png", "plain.png"]
    reasons = {path.name: reason for path, reason in scan.skipped}
    assert "outside the dataset" in reasons["outside.png"]
    assert "broken link" in reasons["dangling.png"]
    assert "link loop" in reasons["loop.png"]
    assert "outside the dataset" in reasons["folder-link"]
    assert "outside.png" in " ".join(scan.warnings())
    # The gallery (what the server sends) lists only files that really live in the dataset.
    assert [image.name for image in list_images(linked)] == ["inside.png", "plain.png"]


def test_check_dataset_lists_every_file_it_cannot_use(linked):
    (linked / "photo.heic").write_bytes(b"\0\0\0\x18ftypheic" + b"\0" * 100)
    (linked / "drawing.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"/>')
    (linked / "shot.cr2").write_bytes(b"II*\0" + b"\0" * 64)
    (linked / "notes.md").write_text("not a picture, and not worth a warning")
    report = check_dataset(linked, resolution=64)
    found = {f.file: " ".join(c["message"] for c in f.checks) for f in report.files if f.status == "error"}
    assert set(found) == {"outside.png", "dangling.png", "loop.png", "folder-link", "photo.heic", "drawing.svg",
                          "shot.cr2"}
    assert "pillow-heif" in found["photo.heic"] and "export it as PNG" in found["drawing.svg"]
    assert "camera RAW" in found["shot.cr2"] and "link loop" in found["loop.png"]
    assert report.summary["errors"] == 7 and report.summary["usable"] == 2
    done = subprocess.run([sys.executable, "-m", "core", "check-dataset", str(linked), "--resolution", "64"],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0 and "Traceback" not in done.stderr
    for name in found:
        assert name in done.stdout


def test_a_header_that_asks_for_too_much_memory_is_unreadable_not_a_crash(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    _png(data / "fine.png")
    _png(data / "hostile.png", seed=1)
    from PIL import ImageFile

    real_load = ImageFile.ImageFile.load

    def load(self):  # what the JPEG 2000 decoder does with a header that claims a gigantic tile
        if "hostile" in str(getattr(self.fp, "name", "")):
            raise MemoryError
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    with pytest.raises(ImageError, match="more memory than a picture"):
        load_image(data / "hostile.png")
    report = check_dataset(data, resolution=64)
    assert [f.file for f in report.files if f.status == "error"] == ["hostile.png"]
    assert [item.name for item in scan_dataset(data).items] == ["fine.png"]


def test_a_giant_caption_is_cut_and_kept_out_of_the_metadata(tiny_model, tmp_path):
    from core.lora.lora_info import read_lora_info
    from core.training import train
    from tests.conftest import EventLog, tiny_config

    data = write_dataset(tmp_path / "d", n=2)
    giant = data / "img1.txt"
    giant.write_text("sks, " + ", ".join(f"tag{i} " + "x" * 50 for i in range(200_000)))  # about 11 MB
    assert giant.stat().st_size > 10 * MAX_CAPTION_BYTES
    assert len(read_caption(giant).encode("utf-8")) <= MAX_CAPTION_BYTES
    scan = scan_dataset(data)
    assert any("img1.txt" in w and "1 MB" in w for w in scan.warnings())
    cfg = tiny_config(tiny_model, data, tmp_path / "out", **{"train.max_train_steps": 1, "sample.prompts": [],
                                                            "dataset.validation_split": 0.0})
    result = train.run(cfg, EventLog())
    assert result.lora_path.stat().st_size < 512 * 1024
    tags = read_lora_info(result.lora_path)["metadata"]["ss_tag_frequency"]
    assert len(tags) < 200_000


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak memory from /proc")
def test_giant_pictures_are_decoded_small_and_over_the_limit_refused(tmp_path):
    """A 144-megapixel JPEG is measured from its header and decoded at reduced size (draft); peak memory of
    the scan stays near that of a small picture. Over MAX_PIXELS the message says how big and what to do."""
    data = tmp_path / "data"
    data.mkdir()
    side = 12_000  # 144 megapixels
    make = ("from PIL import Image; Image.linear_gradient('L').resize(({side}, {side})).convert('RGB')"
            ".save({path!r}, quality=80)").format(side=side, path=str(data / "huge.jpg"))
    subprocess.run([sys.executable, "-c", make], check=True)  # (made elsewhere: this process stays small)
    # The peak of the scanning process alone: VmHWM starts afresh with the program, unlike ru_maxrss.
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from core.data.dataset import scan_dataset
        scan = scan_dataset({str(data)!r})
        peak = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
        print(scan.items[0].size, int(peak.split()[1]) // 1024)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[:2] == [f"({side},", f"{side})"]  # the true size, for buckets and the health report
    peak_mb = int(out[2])
    assert peak_mb < 400, f"scanning a 144 MP JPEG peaked at {peak_mb} MB"
    with Image.open(data / "huge.jpg") as header:
        assert header.size == (side, side)
    # Over the explicit limit: refused before decoding, with the numbers.
    too_big = tmp_path / "too-big.png"
    width = int(MAX_PIXELS ** 0.5) + 100
    Image.new("L", (width, 1)).resize((width, 1)).save(too_big)  # a tiny file...
    _fake_size(too_big, width, width)  # ...whose header claims width x width pixels
    with pytest.raises(ImageError, match=rf"too large \({width * width:,} pixels; limit {MAX_PIXELS:,}\): scale"):
        load_image(too_big)


def _fake_size(path: Path, width: int, height: int) -> None:
    """Rewrite a PNG's IHDR to claim another size (CRC fixed), as a hostile or broken file might."""
    import struct
    import zlib

    data = bytearray(path.read_bytes())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4: ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17: ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr: ihdr + 17])))
    path.write_bytes(bytes(data))


def test_files_the_app_writes_get_the_users_permissions(tmp_path):
    mask = os.umask(0)
    os.umask(mask)
    fsutil.write_text(tmp_path / "a.txt", "x")
    fsutil.save_safetensors(tmp_path / "b.safetensors", {"w": __import__("torch").zeros(2)}, durable=True)
    with fsutil.new_folder(tmp_path / "model") as folder:
        (folder / "x").write_text("y")
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~mask
    assert (tmp_path / "b.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask
    assert (tmp_path / "model").stat().st_mode & 0o777 == 0o777 & ~mask
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_durable_writes_reach_the_disk_before_the_rename(tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else str(fd))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    fsutil.save_safetensors(tmp_path / "lora.safetensors", {"w": __import__("torch").zeros(2)}, durable=True)
    if os.path.exists("/proc/self/fd"):
        assert any(Path(p).name.startswith(".lora.") for p in synced)  # the temporary file, before the rename
        assert str(tmp_path) in synced  # the folder, after it
    else:
        assert len(synced) >= 2
