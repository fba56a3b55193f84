"""core.data.dataset_store: app-owned datasets built from copies of the user's files.

Every file here is real and written in tmp_path. The user's "originals" live
in a downloads folder; uploads arrive the way Gradio hands them over (a
temporary copy with a mangled name, plus the name the user dropped).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.data import caption_edits as edits
from core.data import dataset_store as store
from core.data.dataset import scan_dataset
from core.data.dataset_store import DatasetStoreError

# --------------------------------------------------------------------------
# file builders


def png_bytes(seed: int = 0, size=(24, 16)) -> bytes:
    """A noisy RGB PNG: noise keeps it big enough to truncate meaningfully, seeds make files differ."""
    pixels = (np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(mode: str = "RGB", colour=(10, 200, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (20, 12), colour).save(buf, format="JPEG")
    return buf.getvalue()


def png16_bytes() -> bytes:
    """16-bit greyscale PNG (Pillow mode I;16)."""
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


def write(folder: Path, name: str, data: bytes | str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    else:
        path.write_bytes(data)
    return path


def gradio_uploads(tmp_path: Path, files: dict[str, bytes | str]) -> tuple[list[Path], list[str]]:
    """Copies of ``files`` in a Gradio-like temp dir under mangled names, and the names the user dropped."""
    paths, names = [], []
    for i, (name, data) in enumerate(files.items()):
        mangled = f"upload_{i}{Path(name).suffix}"
        paths.append(write(tmp_path / "gradio" / f"{i:040x}", mangled, data))
        names.append(name)
    return paths, names


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    """mtime and bytes of every file under ``folder``, to prove originals are left untouched."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def temp_files(folder: Path) -> list[str]:
    """Leftover atomic-write temporaries (hidden ``.stem.xxxx.tmp.ext`` files)."""
    return [p.name for p in folder.rglob("*") if ".tmp" in p.name]


# --------------------------------------------------------------------------
# dataset names and folders


@pytest.mark.parametrize("name, expected", [
    ("my dog", "my dog"), ("  v1.5_final-2 ", "v1.5_final-2"), ("chat noir ça 猫", "chat noir ça 猫"),
    ("x" * 100, "x" * 100),
])
def test_valid_names(name, expected):
    assert store.validate_name(name) == expected


@pytest.mark.parametrize("name, message", [
    ("", "empty"), ("   ", "empty"), ("x" * 101, "at most 100"), ("../evil", "contains '/'"),
    ("a/b", "contains '/'"), ("a\\b", "contains '\\\\\\\\'"), ("what?", "contains '\\?'"), (".hidden", "start or end"),
    ("dots.", "start or end"), ("CON", "Windows reserves"), ("nul.txt", "Windows reserves"), ("a\tb", "contains"),
])
def test_invalid_names(name, message):
    with pytest.raises(DatasetStoreError, match=message):
        store.validate_name(name)


def test_create_list_and_find_datasets(tmp_path):
    root = tmp_path / "datasets"
    assert store.list_datasets(root) == []  # the root does not exist yet
    path = store.create_dataset(root, " Zebra ")
    assert path == root / "Zebra" and path.is_dir()
    assert store.create_dataset(root, "Zebra") == path  # creating again is fine
    store.create_dataset(root, "apple")
    (root / ".cache").mkdir()
    (root / "stray file.txt").write_text("not a dataset")
    assert store.list_datasets(root) == ["apple", "Zebra"]
    assert store.dataset_path(root, "apple ") == root / "apple"
    with pytest.raises(DatasetStoreError, match="no dataset named 'missing'"):
        store.dataset_path(root, "missing")
    with pytest.raises(DatasetStoreError, match="is a file"):
        store.create_dataset(root, "stray file.txt")
    with pytest.raises(DatasetStoreError):
        store.dataset_path(root, "../datasets")


# --------------------------------------------------------------------------
# importing


def messy_downloads(tmp_path: Path) -> Path:
    """The user's originals, as they come: every odd kind of file in one drop."""
    d = tmp_path / "Downloads"
    write(d, "dog.png", png_bytes(1))
    write(d, "dog.txt", "sks dog, on a beach\n")
    write(d, "photo.jpg", jpeg_bytes())
    write(d, "print.jpg", jpeg_bytes("CMYK", (0, 255, 0, 0)))
    write(d, "scan16.png", png16_bytes())
    write(d, "broken.png", png_bytes(2)[:200])
    write(d, "zero.png", b"")
    write(d, "fake.png", "I am text, not a PNG")
    write(d, "orphan.txt", "a caption without its image")
    write(d, "really a png.jpg", png_bytes(3))
    write(d, "ça va 猫.png", png_bytes(4))
    write(d, "ça va 猫.txt", "\ufeffcafé au lait, 猫".encode())
    write(d, "notes.md", "# my notes")
    return d


def test_import_a_messy_batch(tmp_path, ds):
    downloads = messy_downloads(tmp_path)
    before = snapshot(downloads)
    files = sorted(downloads.iterdir())
    report = store.import_files(ds, files)

    assert sorted(report.added) == sorted(["dog.png", "photo.jpg", "print.jpg", "scan16.png", "really a png.jpg",
                                           "ça va 猫.png"])
    assert sorted(report.captions) == ["dog.txt", "ça va 猫.txt"]
    reasons = dict(report.rejected)
    assert set(reasons) == {"broken.png", "zero.png", "fake.png", "orphan.txt", "notes.md"}
    assert "truncated" in reasons["broken.png"]
    assert "empty" in reasons["zero.png"]
    assert "not an image" in reasons["fake.png"]
    assert "no image named 'orphan'" in reasons["orphan.txt"]
    assert "only images and .txt captions" in reasons["notes.md"]

    # Stored files are byte-for-byte copies (not re-encoded), captions are UTF-8 without BOM.
    for name in report.added:
        assert (ds / name).read_bytes() == (downloads / name).read_bytes(), name
    assert (ds / "ça va 猫.txt").read_bytes() == "café au lait, 猫".encode()
    assert (ds / "dog.txt").read_text(encoding="utf-8") == "sks dog, on a beach"
    assert not (ds / "orphan.txt").exists() and not (ds / "broken.png").exists()
    # The originals were only read.
    assert snapshot(downloads) == before
    assert temp_files(ds) == []

    # The engine reads the dataset as stored.
    scan = scan_dataset(ds)
    assert sorted(item.name for item in scan.items) == sorted(report.added)
    assert scan.skipped == [] and scan.ignored == []
    assert store.counts(ds) == {"images": 6, "captioned": 2, "uncaptioned": 4}


def test_images_are_processed_before_captions(tmp_path, ds):
    """A caption listed before its image still pairs with it."""
    paths, names = gradio_uploads(tmp_path, {"b.txt": "caption of b", "b.png": png_bytes(1)})
    report = store.import_files(ds, paths, names)
    assert report.added == ["b.png"] and report.captions == ["b.txt"] and report.rejected == []


def test_gradio_temp_names_are_replaced_by_original_names(tmp_path, ds):
    paths, names = gradio_uploads(tmp_path, {"My Cat.PNG": png_bytes(1), "My Cat.txt": "tabby",
                                             "C:\\Users\\me\\Pictures\\café.jpg": jpeg_bytes()})
    report = store.import_files(ds, paths, names)
    assert report.added == ["My Cat.PNG", "café.jpg"]
    assert report.captions == ["My Cat.txt"]
    assert sorted(p.name for p in ds.iterdir()) == ["My Cat.PNG", "My Cat.txt", "café.jpg"]
    assert not any(p.name.startswith("upload_") for p in ds.iterdir())


def test_original_names_must_match_paths(tmp_path, ds):
    paths, _ = gradio_uploads(tmp_path, {"a.png": png_bytes()})
    with pytest.raises(DatasetStoreError, match="1 files but 2 original names"):
        store.import_files(ds, paths, ["a.png", "b.png"])


def test_hidden_upload_names_are_rejected(tmp_path, ds):
    paths, names = gradio_uploads(tmp_path, {"._dog.png": png_bytes(1), ".DS_Store": b"\0\0"})
    report = store.import_files(ds, paths, names)
    assert report.added == [] and [n for n, _ in report.rejected] == ["._dog.png", ".DS_Store"]
    assert "starts with '.'" in report.rejected[0][1]
    assert list(ds.iterdir()) == []


def test_an_image_with_a_non_image_extension_is_rejected(tmp_path, ds):
    paths, names = gradio_uploads(tmp_path, {"picture.dat": png_bytes(1)})
    report = store.import_files(ds, paths, names)
    assert report.added == []
    assert "'.dat' is not an image file extension" in report.rejected[0][1]


def test_reimporting_the_same_file_copies_nothing(tmp_path, ds):
    original = write(tmp_path / "Downloads", "dog.png", png_bytes(1))
    assert store.import_files(ds, [original]).added == ["dog.png"]
    mtime = (ds / "dog.png").stat().st_mtime_ns
    caption = write(tmp_path / "Downloads", "dog.txt", "second try")
    report = store.import_files(ds, [original, caption])
    assert report.added == [] and report.unchanged == ["dog.png"]  # said so: "already there", not "added"
    assert report.captions == ["dog.txt"]
    assert sorted(p.name for p in ds.iterdir()) == ["dog.png", "dog.txt"]
    assert (ds / "dog.png").stat().st_mtime_ns == mtime  # not rewritten
    assert (ds / "dog.txt").read_text(encoding="utf-8") == "second try"


def test_a_different_picture_under_a_taken_name_replaces_it_and_the_old_one_is_kept(tmp_path, ds):
    """Dropping edited pictures again under their names replaces them; the old ones go to .removed/ (restorable),
    and their captions stay unless new ones came with the upload."""
    first = write(tmp_path / "day1", "dog.png", png_bytes(1))
    other = write(tmp_path / "day1", "cat.png", png_bytes(3))
    write(tmp_path / "day1", "dog.txt", "first dog")
    write(tmp_path / "day1", "cat.txt", "first cat")
    store.import_files(ds, [first, other, tmp_path / "day1" / "dog.txt", tmp_path / "day1" / "cat.txt"])
    second = write(tmp_path / "day2", "dog.png", png_bytes(2))
    second_cat = write(tmp_path / "day2", "cat.png", png_bytes(4))
    second_caption = write(tmp_path / "day2", "dog.txt", "second dog")
    report = store.import_files(ds, [second, second_cat, second_caption])
    assert report.replaced == ["dog.png", "cat.png"] and report.added == [] and report.captions == ["dog.txt"]
    assert (ds / "dog.png").read_bytes() == second.read_bytes()
    assert (ds / "dog.txt").read_text(encoding="utf-8") == "second dog"  # a new caption came
    assert (ds / "cat.txt").read_text(encoding="utf-8") == "first cat"  # none came: the old one stays
    assert store.list_removed(ds) == ["cat.png", "dog.png"]
    assert (ds / store.REMOVED_DIR / "dog.png").read_bytes() == first.read_bytes()
    assert store.counts(ds)["images"] == 2
    # Importing the second file again: the same bytes, nothing copied or replaced.
    again = store.import_files(ds, [second])
    assert again.unchanged == ["dog.png"] and again.replaced == [] and again.added == []


def test_same_stem_other_extension_or_case_is_renamed(tmp_path, ds):
    """a.jpg beside a.png would share a.txt, and A.png clashes with a.png on Windows/macOS."""
    paths, names = gradio_uploads(tmp_path, {"a.png": png_bytes(1), "a.jpg": jpeg_bytes(), "A.png": png_bytes(2)})
    report = store.import_files(ds, paths, names)
    assert report.added == ["a.png", "a (2).jpg", "A (3).png"]


def test_uploaded_caption_replaces_the_old_one_and_cp1252_is_read(tmp_path, ds):
    image = write(tmp_path / "d", "x.png", png_bytes(1))
    store.import_files(ds, [image, write(tmp_path / "d", "x.txt", "old caption")])
    newer = write(tmp_path / "e", "x.txt", "caf\xe9 cr\xe8me".encode("cp1252"))
    report = store.import_files(ds, [newer])
    assert report.captions == ["x.txt"] and report.rejected == []
    assert (ds / "x.txt").read_bytes() == "café crème".encode()


def test_caption_of_a_rejected_image_says_so(tmp_path, ds):
    paths, names = gradio_uploads(tmp_path, {"bad.png": b"", "bad.txt": "caption"})
    reasons = dict(store.import_files(ds, paths, names).rejected)
    assert "its image 'bad.png' was rejected" in reasons["bad.txt"]


def test_binary_txt_is_not_a_caption(tmp_path, ds):
    paths, names = gradio_uploads(tmp_path, {"a.png": png_bytes(1), "a.txt": png_bytes(2)})
    report = store.import_files(ds, paths, names)
    assert report.added == ["a.png"] and "not a text file" in dict(report.rejected)["a.txt"]
    assert not (ds / "a.txt").exists()


def test_import_into_missing_dataset(tmp_path):
    with pytest.raises(DatasetStoreError, match="does not exist"):
        store.import_files(tmp_path / "nope", [])


def test_many_files_no_cap(tmp_path, ds):
    paths, names = gradio_uploads(tmp_path, {f"img{i:03d}.png": png_bytes(i, (4, 4)) for i in range(150)})
    assert len(store.import_files(ds, paths, names).added) == 150


# --------------------------------------------------------------------------
# listing


def test_list_images_does_not_decode_and_skips_hidden(ds):
    for i in range(2000):
        (ds / f"{i:04d}.png").write_bytes(b"garbage, not a png")
    (ds / "0001.txt").write_text("  a caption\nover two lines ")
    (ds / "0002.txt").write_text("   \n")  # blank: not a caption
    (ds / ".hidden.png").write_bytes(b"x")
    (ds / "readme.md").write_text("not an image")
    (ds / ".removed").mkdir()
    (ds / ".removed" / "gone.png").write_bytes(b"x")
    (ds / "sub").mkdir()
    (ds / "sub" / "nested.png").write_bytes(b"x")

    images = store.list_images(ds)
    assert len(images) == 2000
    assert images[0].name == "0000.png" and images[-1].name == "1999.png"
    assert images[1].caption == "a caption over two lines" and images[1].has_caption
    assert images[2].caption == "" and not images[2].has_caption
    assert images[0].path == ds / "0000.png"
    assert store.counts(ds) == {"images": 2000, "captioned": 1, "uncaptioned": 1999}


def test_list_images_sorts_case_insensitively(ds):
    for name in ["b.png", "A.png", "c.jpg"]:
        (ds / name).write_bytes(b"x")
    assert [i.name for i in store.list_images(ds)] == ["A.png", "b.png", "c.jpg"]


# --------------------------------------------------------------------------
# removing and restoring


def imported(tmp_path: Path, ds: Path, files: dict[str, bytes | str]) -> Path:
    paths, names = gradio_uploads(tmp_path, files)
    report = store.import_files(ds, paths, names)
    assert report.rejected == []
    return ds


def test_remove_and_restore(tmp_path, ds):
    imported(tmp_path, ds, {"dog.png": png_bytes(1), "dog.txt": "sks dog", "cat.png": png_bytes(2)})
    removed = store.remove_image(ds, "dog.png")
    assert removed == ds / ".removed" / "dog.png"
    assert removed.read_bytes() == png_bytes(1)
    assert (ds / ".removed" / "dog.txt").read_text(encoding="utf-8") == "sks dog"
    assert not (ds / "dog.png").exists() and not (ds / "dog.txt").exists()
    assert [i.name for i in store.list_images(ds)] == ["cat.png"]
    assert [i.name for i in scan_dataset(ds).items] == ["cat.png"]
    assert store.list_removed(ds) == ["dog.png"]

    restored = store.restore_image(ds, "dog.png")
    assert restored == ds / "dog.png" and restored.read_bytes() == png_bytes(1)
    assert [(i.name, i.caption) for i in store.list_images(ds)] == [("cat.png", ""), ("dog.png", "sks dog")]
    assert store.list_removed(ds) == []
    assert not (ds / ".removed" / "dog.txt").exists()


def test_removing_the_same_name_twice_and_restoring_under_the_original_name(tmp_path, ds):
    imported(tmp_path / "1", ds, {"dog.png": png_bytes(1), "dog.txt": "first"})
    store.remove_image(ds, "dog.png")
    imported(tmp_path / "2", ds, {"dog.png": png_bytes(2), "dog.txt": "second"})
    second = store.remove_image(ds, "dog.png")
    assert second.name == "dog (2).png"
    assert (ds / ".removed" / "dog (2).txt").read_text(encoding="utf-8") == "second"
    assert store.list_removed(ds) == ["dog (2).png", "dog.png"]

    restored = store.restore_image(ds, "dog (2).png")
    assert restored == ds / "dog.png"  # the name it had in the dataset
    assert restored.read_bytes() == png_bytes(2)
    assert (ds / "dog.txt").read_text(encoding="utf-8") == "second"
    with pytest.raises(DatasetStoreError, match="already has an image named like 'dog.png'"):
        store.restore_image(ds, "dog.png")
    assert (ds / ".removed" / "dog.png").read_bytes() == png_bytes(1)  # still safe in .removed


def test_restore_refuses_to_overwrite_a_caption(tmp_path, ds):
    imported(tmp_path, ds, {"dog.png": png_bytes(1), "dog.txt": "mine"})
    store.remove_image(ds, "dog.png")
    (ds / "dog.txt").write_text("someone else's")
    with pytest.raises(DatasetStoreError, match="'dog.txt' is already in the dataset"):
        store.restore_image(ds, "dog.png")
    assert (ds / "dog.txt").read_text() == "someone else's"
    assert (ds / ".removed" / "dog.png").exists()


def test_remove_keeps_a_caption_another_image_still_reads(ds):
    (ds / "a.png").write_bytes(b"x")
    (ds / "a.jpg").write_bytes(b"y")
    (ds / "a.txt").write_text("shared")
    store.remove_image(ds, "a.png")
    assert (ds / "a.txt").read_text() == "shared"
    assert (ds / ".removed" / "a.txt").read_text() == "shared"


@pytest.mark.parametrize("name", ["../x.png", "missing.png", ".removed", "sub/x.png"])
def test_remove_and_restore_refuse_bad_names(ds, name):
    (ds / "x.png").write_bytes(b"x")
    with pytest.raises(DatasetStoreError):
        store.remove_image(ds, name)
    with pytest.raises(DatasetStoreError):
        store.restore_image(ds, name)
    assert (ds / "x.png").exists()


def test_no_temporary_files_after_a_session(tmp_path, ds):
    imported(tmp_path, ds, {"a.png": png_bytes(1), "a.txt": "x", "b.png": png_bytes(2)})
    edits.add_trigger_word(ds, "sks")
    store.remove_image(ds, "b.png")
    store.restore_image(ds, "b.png")
    assert temp_files(ds) == []
    assert sorted(os.listdir(ds)) == [".removed", "a.png", "a.txt", "b.png", "b.txt"]
