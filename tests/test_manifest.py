"""dataset.toml: exclusions and per-folder repeats, honoured by the scan; the split keeps near-duplicates together."""

import numpy as np
import pytest
from PIL import Image

from core.data import manifest
from core.data.dataset import DatasetError, load_split, scan_dataset, split_items
from core.data.manifest import ManifestError, load_manifest, set_decision, set_repeats


def noise(path, seed, size=(64, 48)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def concepts(tmp_path):
    d = tmp_path / "set"
    noise(d / "root.png", 0)
    for i in range(3):
        noise(d / "close ups" / f"c{i}.png", 10 + i)
        noise(d / "full body" / "nested" / f"f{i}.jpg", 20 + i)
    return d


def test_decisions_and_repeats_round_trip_through_toml(concepts):
    set_decision(concepts, "close ups/c1.png", "exclude", "blurry")
    set_decision(concepts, "root.png", "keep", "small on purpose")
    set_repeats(concepts, "close ups", 3)
    set_repeats(concepts, "full body", 2)
    text = manifest.manifest_path(concepts).read_text(encoding="utf-8")
    assert 'decision = "exclude"' in text and "repeats = 3" in text
    m = load_manifest(concepts)
    assert m.decision("close ups/c1.png") == "exclude" and m.images["close ups/c1.png"].reason == "blurry"
    assert m.decision("root.png") == "keep" and m.decision("close ups/c0.png") is None
    assert m.repeats_for("close ups/c0.png") == 3
    assert m.repeats_for("full body/nested/f0.jpg") == 2  # nearest listed folder up the tree
    assert m.repeats_for("root.png") == 1
    set_decision(concepts, "close ups/c1.png", None)  # undo
    set_repeats(concepts, "full body", 1)  # back to the default: the entry goes
    m = load_manifest(concepts)
    assert "close ups/c1.png" not in m.images and "full body" not in m.concepts


def test_scan_leaves_out_excluded_images_and_applies_repeats(concepts):
    before = {p.name: p.stat().st_mtime_ns for p in concepts.rglob("*.png")}
    set_decision(concepts, "close ups/c1.png", "exclude")
    set_decision(concepts, "root.png", "keep")
    set_repeats(concepts, "close ups", 4)
    scan = scan_dataset(concepts)
    names = {item.path.name: item.repeats for item in scan.items}
    assert "c1.png" not in names and names["c0.png"] == 4 and names["root.png"] == 1 and names["f2.jpg"] == 1
    assert [p.name for p in scan.excluded] == ["c1.png"]
    assert any("excluded in dataset.toml: close ups/c1.png" in n for n in scan.notes())
    assert any("close ups x4" in n for n in scan.notes())
    assert (concepts / "close ups" / "c1.png").is_file()  # excluding never deletes or touches a file
    assert {p.name: p.stat().st_mtime_ns for p in concepts.rglob("*.png")} == before


@pytest.mark.parametrize("text, message", [
    ("version = 1\n[images]\n\"a.png\" = { decision = \"delete\" }\n", "use one of 'exclude', 'keep'"),
    ("version = 1\n[concepts.x]\nrepeats = 0\n", "whole number from 1 to"),
    ("version = 99\n", "newer than this app"),
    ("version = 1\n[images\n", "not valid TOML"),
])
def test_bad_manifests_are_reported_with_the_file(tmp_path, text, message):
    noise(tmp_path / "a.png", 0)
    (tmp_path / "dataset.toml").write_text(text, encoding="utf-8")
    with pytest.raises(ManifestError, match=message):
        load_manifest(tmp_path)
    with pytest.raises(DatasetError, match="dataset.toml"):
        scan_dataset(tmp_path)


def test_paths_must_stay_inside_the_dataset(concepts):
    with pytest.raises(ManifestError, match="not a path inside"):
        set_decision(concepts, "../elsewhere.png", "exclude")
    with pytest.raises(ManifestError, match="not a subfolder"):
        set_repeats(concepts, "no such folder", 2)
    assert manifest.normalise("close ups\\c0.png") == "close ups/c0.png"


# --------------------------------------------------------------------------
# split


def _near_copy(src, dst):
    """A re-encode of src, slightly darker: a near-duplicate by perceptual hash."""
    with Image.open(src) as image:
        arr = np.asarray(image.convert("RGB"), dtype=np.int16) - 3
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(dst, quality=90)


def test_split_never_separates_near_duplicates(tmp_path):
    d = tmp_path / "d"
    for i in range(12):
        noise(d / f"{i:02d}.png", i, size=(96, 96))
    for i in range(4):  # four pictures each with a near copy
        _near_copy(d / f"{i:02d}.png", d / f"{i:02d} copy.jpg")
    items = scan_dataset(d).items
    for seed in range(25):
        train, val = split_items(items, 0.25, seed)
        assert len(val) == 4 and len(train) == 12
        stems = lambda xs: {x.path.stem.removesuffix(" copy") for x in xs}  # noqa: E731
        assert not stems(train) & stems(val), f"seed {seed}: a picture is on both sides"
        assert split_items(list(reversed(items)), 0.25, seed) == (train, val)  # deterministic


def test_split_uses_groups_when_there_are_no_single_images(tmp_path):
    d = tmp_path / "d"
    for i in range(3):
        noise(d / f"{i}.png", i, size=(96, 96))
        _near_copy(d / f"{i}.png", d / f"{i} copy.jpg")
    train, val = split_items(scan_dataset(d).items, 0.3, 0)
    assert len(val) == 2 and len({v.path.stem.removesuffix(" copy") for v in val}) == 1  # one whole pair


def test_explicit_validation_folder_inside_the_dataset(tmp_path):
    d = tmp_path / "d"
    for i in range(5):
        noise(d / f"t{i}.png", i)
    noise(d / "val" / "v0.png", 100)
    noise(d / "val" / "v1.png", 101)
    _near_copy(d / "val" / "v0.png", d / "t-copy-of-v0.jpg")
    split = load_split(d, ".txt", 0.5, 0, d / "val")
    assert sorted(i.path.name for i in split.validation) == ["v0.png", "v1.png"]
    assert sorted(i.path.name for i in split.train) == [f"t{i}.png" for i in range(5)]
    assert any("t-copy-of-v0.jpg" in w and "duplicate a validation image" in w for w in split.warnings)


def test_explicit_validation_folder_elsewhere_and_errors(tmp_path):
    d, v = tmp_path / "d", tmp_path / "held out"
    for i in range(3):
        noise(d / f"t{i}.png", i)
    noise(v / "v.png", 50)
    split = load_split(d, ".txt", 0.0, 0, v)
    assert [i.path.name for i in split.validation] == ["v.png"] and len(split.train) == 3
    with pytest.raises(DatasetError, match="does not exist"):
        load_split(d, ".txt", 0.1, 0, tmp_path / "missing")
    with pytest.raises(DatasetError, match="the dataset folder itself"):
        load_split(d, ".txt", 0.1, 0, d)
