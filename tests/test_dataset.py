"""Finding images and captions in a user's folder, and the train/validation split."""


import numpy as np
import pytest
from PIL import Image

from core.data.dataset import DatasetError, read_caption, require_images, scan_dataset, split_items


def _png(path, colour=(200, 10, 10), size=(32, 24)):
    Image.new("RGB", size, colour).save(path, format="PNG")


@pytest.fixture
def messy(tmp_path):
    """A folder as users really have them."""
    d = tmp_path / "my pics"
    (d / "sub folder").mkdir(parents=True)
    _png(d / "a.png")
    (d / "a.txt").write_text("a photo of sks\n  on a beach \n", encoding="utf-8")
    _png(d / "sub folder" / "b ünï 猫.png")
    (d / "sub folder" / "b ünï 猫.txt").write_bytes("\ufeffsks smiling".encode("utf-8"))  # BOM
    _png(d / "c.jpg")  # a PNG with the wrong extension
    (d / "c.txt").write_bytes("caf\xe9 sks".encode("cp1252"))  # not UTF-8
    Image.new("CMYK", (20, 20), (0, 255, 0, 0)).save(d / "d.jpg")  # no caption
    (d / "empty.png").write_bytes(b"")
    data = (d / "a.png").read_bytes()
    (d / "truncated.png").write_bytes(data[: len(data) // 2])
    (d / "notes.docx").write_bytes(b"PK\x03\x04 not an image")
    (d / "README.md").write_text("my dataset")
    (d / ".hidden.png").write_bytes(b"garbage")
    (d / ".cache").mkdir()
    (d / ".cache" / "x.png").write_bytes(b"garbage")
    return d


def test_scan_finds_images_captions_and_problems(messy):
    scan = scan_dataset(messy)
    names = sorted(item.path.name for item in scan.items)
    assert names == ["a.png", "b ünï 猫.png", "c.jpg", "d.jpg"]
    captions = {item.path.name: item.caption for item in scan.items}
    assert captions["a.png"] == "a photo of sks on a beach"
    assert captions["b ünï 猫.png"] == "sks smiling"
    assert captions["c.jpg"] == "café sks"
    assert captions["d.jpg"] == ""
    skipped = {p.name: reason for p, reason in scan.skipped}
    assert set(skipped) == {"empty.png", "truncated.png"}
    assert "empty" in skipped["empty.png"] and "truncated" in skipped["truncated.png"]
    assert [p.name for p in scan.ignored] == ["notes.docx"]
    assert [p.name for p in scan.missing_captions] == ["d.jpg"]
    warnings = "\n".join(scan.warnings())
    assert "empty.png" in warnings and "truncated.png" in warnings and "d.jpg" in warnings


def test_scan_never_writes_to_the_dataset(messy):
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in messy.rglob("*")}
    scan_dataset(messy)
    after = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in messy.rglob("*")}
    assert before == after


def test_no_readable_image_is_a_clear_error(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff nope")
    (tmp_path / "x.txt").write_text("caption")
    with pytest.raises(DatasetError, match=r"no readable image in dataset folder .*broken.jpg"):
        require_images(scan_dataset(tmp_path))


def test_missing_folder(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        scan_dataset(tmp_path / "missing")


def test_caption_extension_is_configurable(tmp_path):
    _png(tmp_path / "a.png")
    (tmp_path / "a.caption").write_text("from caption file")
    (tmp_path / "a.txt").write_text("from txt")
    assert scan_dataset(tmp_path, ".caption").items[0].caption == "from caption file"
    assert scan_dataset(tmp_path).items[0].caption == "from txt"


def test_read_caption_joins_lines(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("one,\r\ntwo\n\nthree  ", encoding="utf-8")
    assert read_caption(p) == "one, two three"


def _noise(path, seed, size=(48, 40)):
    """A picture unlike every other seed's (random pixels), so no two count as near-duplicates."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _items(tmp_path, n):
    for i in range(n):
        _noise(tmp_path / f"{i:03d}.png", i)
    return scan_dataset(tmp_path).items


@pytest.mark.parametrize("n,fraction,expected_val", [(1, 0.1, 0), (2, 0.1, 1), (10, 0.1, 1), (10, 0.25, 2),
                                                     (10, 0.0, 0), (3, 0.9, 2), (40, 0.1, 4)])
def test_split_sizes(tmp_path, n, fraction, expected_val):
    train, val = split_items(_items(tmp_path, n), fraction, seed=0)
    assert len(val) == expected_val
    assert len(train) + len(val) == n and len(train) >= 1
    assert not {i.path for i in train} & {i.path for i in val}


def test_split_is_deterministic_by_seed_and_independent_of_order(tmp_path):
    items = _items(tmp_path, 20)
    a = split_items(items, 0.2, seed=1)
    b = split_items(list(reversed(items)), 0.2, seed=1)
    c = split_items(items, 0.2, seed=2)
    assert [i.path for i in a[1]] == [i.path for i in b[1]]
    assert [i.path for i in a[1]] != [i.path for i in c[1]]
