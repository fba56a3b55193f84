"""core.data.caption_edits: one caption, and the bulk tools over every caption of a dataset."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.data import caption_edits as edits
from core.data import dataset_store as store
from core.data.dataset_store import DatasetStoreError
from tests.test_dataset_store import png_bytes, temp_files


def test_save_caption_round_trip(ds):
    (ds / "猫 ça.png").write_bytes(png_bytes(1))
    path = edits.save_caption(ds, "猫 ça.png", "  un chat, 猫 \n")
    assert path == ds / "猫 ça.txt"
    assert path.read_bytes() == "un chat, 猫".encode()
    assert store.list_images(ds)[0].caption == "un chat, 猫"
    edits.save_caption(ds, "猫 ça.png", "replaced")
    assert path.read_text(encoding="utf-8") == "replaced"
    assert temp_files(ds) == []
    assert sorted(p.name for p in ds.iterdir()) == ["猫 ça.png", "猫 ça.txt"]


@pytest.mark.parametrize("name", ["../x.png", "sub/x.png", "sub\\x.png", "..", ".", "", ".x.png", "/etc/x.png",
                                  "missing.png", "x.txt"])
def test_save_caption_refuses_names_outside_or_missing(tmp_path, ds, name):
    (ds / "sub").mkdir()
    (ds / "sub" / "x.png").write_bytes(png_bytes(1))
    (tmp_path / "datasets" / "x.png").write_bytes(png_bytes(1))
    (ds / ".x.png").write_bytes(png_bytes(1))
    (ds / "x.txt").write_text("a caption file, not an image")
    with pytest.raises(DatasetStoreError):
        edits.save_caption(ds, name, "pwned")
    assert not (tmp_path / "datasets" / "x.txt").exists()
    assert not (ds / "sub" / "x.txt").exists()
    assert (ds / "x.txt").read_text() == "a caption file, not an image"


def captioned(ds: Path, captions: dict[str, str | None]) -> Path:
    """Images a.png, b.png, ... with the given captions (None: no caption file)."""
    for name, caption in captions.items():
        (ds / f"{name}.png").write_bytes(b"x")
        if caption is not None:
            (ds / f"{name}.txt").write_text(caption, encoding="utf-8")
    return ds


def caption_texts(ds: Path) -> dict[str, str | None]:
    return {p.stem: (p.with_suffix(".txt").read_text(encoding="utf-8") if p.with_suffix(".txt").exists() else None)
            for p in sorted(ds.glob("*.png"))}


def test_add_trigger_word(ds):
    captioned(ds, {"a": "a dog", "b": "sks, a dog", "c": "SKS,dog", "d": None, "e": "  ", "f": "sks dog", "g": ",x"})
    assert edits.add_trigger_word(ds, " sks ") == 5
    assert caption_texts(ds) == {"a": "sks, a dog", "b": "sks, a dog", "c": "SKS,dog", "d": "sks", "e": "sks",
                                 "f": "sks, sks dog", "g": "sks, x"}
    assert edits.add_trigger_word(ds, "sks") == 0  # idempotent
    with pytest.raises(DatasetStoreError, match="empty"):
        edits.add_trigger_word(ds, "  ")
    with pytest.raises(DatasetStoreError, match="comma"):
        edits.add_trigger_word(ds, "sks, dog")


def test_find_replace(ds):
    captioned(ds, {"a": "a dog, dog park", "b": "a cat", "c": None, "d": "dogs (.*) here"})
    assert edits.find_replace(ds, "dog", "puppy") == 2
    assert caption_texts(ds) == {"a": "a puppy, puppy park", "b": "a cat", "c": None, "d": "puppys (.*) here"}
    assert edits.find_replace(ds, "(.*)", "[x]") == 1  # plain text, not a regex
    assert caption_texts(ds)["d"] == "puppys [x] here"
    assert edits.find_replace(ds, "zebra", "horse") == 0
    assert edits.find_replace(ds, "a cat", "") == 1
    assert caption_texts(ds)["b"] == ""
    with pytest.raises(DatasetStoreError, match="empty"):
        edits.find_replace(ds, "", "x")


def test_find_replace_edits_a_shared_caption_once(ds):
    """a.png and a.jpg both read a.txt: replacing "x" by "xx" must not run twice on it."""
    (ds / "a.png").write_bytes(b"x")
    (ds / "a.jpg").write_bytes(b"x")
    (ds / "a.txt").write_text("x")
    assert edits.find_replace(ds, "x", "xx") == 1
    assert (ds / "a.txt").read_text() == "xx"


@pytest.mark.parametrize("where, text, before, after", [
    ("append", "high quality", "a dog", "a dog, high quality"),
    ("append", ", high quality ", "a dog, ", "a dog, high quality"),
    ("append", "high quality", "a dog,\n", "a dog, high quality"),
    ("append", "high quality", "a dog, high quality", "a dog, high quality"),
    ("append", "quality", "high quality", "high quality, quality"),  # whole tags only
    ("append", "best, 4k", "a dog, best, 4k", "a dog, best, 4k"),
    ("append", "4k", "", "4k"),
    ("append", "4k", None, "4k"),
    ("prepend", "photo", "a dog", "photo, a dog"),
    ("prepend", "photo,", " , a dog", "photo, a dog"),
    ("prepend", "photo", "photo, a dog", "photo, a dog"),
    ("prepend", "photo", "photograph of a dog", "photo, photograph of a dog"),
    ("prepend", "photo", "   ", "photo"),
])
def test_add_text(ds, where, text, before, after):
    captioned(ds, {"a": before})
    changed = edits.add_text(ds, text, where)
    assert caption_texts(ds)["a"] == after
    assert changed == (0 if after == before else 1)
    assert edits.add_text(ds, text, where) == 0  # repeating is harmless


def test_add_text_errors(ds):
    with pytest.raises(DatasetStoreError, match="empty"):
        edits.add_text(ds, " , ", "append")
    with pytest.raises(DatasetStoreError, match="prepend"):
        edits.add_text(ds, "x", "middle")


def test_bulk_edits_write_utf8_atomically(ds):
    (ds / "a.png").write_bytes(b"x")
    (ds / "a.txt").write_bytes("caf\xe9".encode("cp1252"))
    assert edits.add_text(ds, "猫", "append") == 1
    assert (ds / "a.txt").read_bytes() == "café, 猫".encode()
    assert temp_files(ds) == []

