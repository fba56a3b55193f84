"""The datasets the app owns: folders of copied images and captions that the Dataset tab manages.

A dataset is ``<root>/<name>/``: images copied from the user's files, each
with a same-stem ``.txt`` caption, which is exactly the folder format that
``core.data.dataset.scan_dataset`` trains on. The user's originals are only ever
read. Every file written here goes through ``core.fsutil`` (a temporary file
moved into place), so a crash never leaves half an image or half a caption.

Two rules keep the folder unambiguous:

- A caption pairs with its image by stem (``a.png`` <- ``a.txt``), so no two
  images share a stem: an import that would put ``a.jpg`` beside ``a.png``
  stores it as ``a (2).jpg`` instead. Stems are compared case-insensitively,
  because Windows and macOS file systems treat ``A.png`` and ``a.png`` as one.
- Nothing is deleted: a removed image (with its caption) goes to the hidden
  ``.removed/`` subfolder, which both the engine and ``list_images`` skip, and
  ``restore_image`` brings it back (``core.data.dataset_files``, with the
  rules for names, stems and captions).

No gradio here: the UI calls these plain functions.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from core import fsutil
from core.data.dataset import (
    CAPTION_EXTENSION,
    MAX_CAPTION_BYTES,
    caption_path,
    decode_caption,
    picture_files,
    read_caption,
)
from core.data.dataset_files import (  # noqa: F401 - read from here too
    REMOVED_DIR,
    DatasetStoreError,
    existing_dir,
    is_caption_name,
    list_removed,
    remove_image,
    restore_image,
    sort_key,
    stem_index,
    stem_key,
    to_trash,
)
from core.data.images import ImageError, file_digest, is_image_extension, load_image

log = logging.getLogger(__name__)

_MAX_NAME_CHARS = 100
# Names Windows reserves for devices: a folder called "con" cannot be created there.
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}


# --------------------------------------------------------------------------
# datasets under the app's root


def validate_name(name: str) -> str:
    """Return the stripped dataset name, or raise if it cannot be a portable folder name.

    The name becomes a folder on the user's disk, so it is limited to what
    every OS accepts: letters, digits, space, ``-``, ``_`` and ``.``; no
    leading dot (that would hide it), no trailing dot (Windows drops it),
    and none of the device names Windows reserves.
    """
    if not isinstance(name, str):
        raise DatasetStoreError(f"the dataset name must be text, got {type(name).__name__}")
    clean = name.strip()
    if not clean:
        raise DatasetStoreError("the dataset name is empty; type a name such as 'my-dog'")
    if len(clean) > _MAX_NAME_CHARS:
        raise DatasetStoreError(f"the dataset name is {len(clean)} characters long; use at most {_MAX_NAME_CHARS}")
    bad = sorted({c for c in clean if not (c.isalnum() or c in " -_.")})
    if bad:
        shown = " ".join(repr(c) for c in bad)
        raise DatasetStoreError(f"the dataset name {clean!r} contains {shown}; use only letters, digits, "
                                "spaces, '-', '_' and '.'")
    if clean.startswith(".") or clean.endswith("."):
        raise DatasetStoreError(f"the dataset name {clean!r} cannot start or end with '.'; remove the dot")
    if clean.split(".")[0].strip().lower() in _WINDOWS_RESERVED:
        raise DatasetStoreError(f"{clean!r} is a name Windows reserves for a device; choose another name")
    return clean


def list_datasets(root: str | os.PathLike) -> list[str]:
    """Names of the dataset folders under ``root`` (hidden ones skipped), sorted case-insensitively.

    A root that does not exist yet simply holds no datasets.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    names = [entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith(".")]
    return sorted(names, key=sort_key)


def create_dataset(root: str | os.PathLike, name: str) -> Path:
    """Create ``<root>/<name>/`` (fine if it already exists) and return its path."""
    path = Path(root) / validate_name(name)
    if path.exists() and not path.is_dir():
        raise DatasetStoreError(f"{path} exists and is a file, not a dataset folder; choose another name")
    path.mkdir(parents=True, exist_ok=True)
    return path


def dataset_path(root: str | os.PathLike, name: str) -> Path:
    """The folder of an existing dataset; raises if the name is invalid or the folder is missing."""
    path = Path(root) / validate_name(name)
    if not path.is_dir():
        raise DatasetStoreError(f"there is no dataset named {path.name!r} in {root}; create it first "
                                "or pick one from the list")
    return path


# --------------------------------------------------------------------------
# importing the user's files


@dataclass
class ImportReport:
    added: list[str] = field(default_factory=list)  # image file names as stored in the dataset
    captions: list[str] = field(default_factory=list)  # caption file names stored
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (original file name, reason)
    replaced: list[str] = field(default_factory=list)  # a different picture of that name was there (now in .removed/)
    unchanged: list[str] = field(default_factory=list)  # the very same picture was there already


class _Rejected(Exception):
    """One uploaded file cannot be imported; carries the reason shown to the user."""


def import_files(dataset_dir: str | os.PathLike, paths: list[str | Path],
                 original_names: list[str] | None = None) -> ImportReport:
    """Copy images and captions into a dataset; report what was stored and what was refused, and why.

    ``paths`` are readable files (Gradio's temporary copies of uploads);
    ``original_names`` are the names the user dropped, used for the stored
    files because Gradio may mangle the temporary ones. Images go first, so
    that a caption can follow its image when the image had to be renamed.
    One bad file never stops the batch: it is listed in ``rejected``.
    """
    folder = existing_dir(dataset_dir)
    uploads = _uploads(paths, original_names)
    report = ImportReport()
    index = stem_index(folder)
    stored: dict[str, str] = {}  # key of the uploaded stem -> stem stored in the dataset
    failed: dict[str, str] = {}  # key of the uploaded stem -> name of the image that was rejected
    batch: set[Path] = set()  # images this upload stored (one of them is never replaced by another)
    # Stable order: images first (as given), then captions (as given).
    ordered = sorted(uploads, key=lambda upload: is_caption_name(upload[1]))
    for src, name in ordered:
        try:
            if not name or name.startswith("."):
                raise _Rejected(_bad_upload_name_reason(name))
            if is_caption_name(name):
                report.captions.append(_import_caption(folder, index, stored, failed, src, name))
            else:
                dest, how = _import_image(folder, index, src, name, batch)
                stored.setdefault(stem_key(Path(name).stem), dest.stem)
                batch.add(dest)
                {"added": report.added, "replaced": report.replaced, "unchanged": report.unchanged}[how].append(
                    dest.name)
        except _Rejected as rejected:
            if not is_caption_name(name):
                failed.setdefault(stem_key(Path(name).stem), name)
            report.rejected.append((name, str(rejected)))
    return report


def _uploads(paths: list[str | Path], original_names: list[str] | None) -> list[tuple[Path, str]]:
    """Pair each uploaded path with the plain file name it should be stored under."""
    paths = [Path(p) for p in paths]
    if original_names is None:
        return [(p, p.name) for p in paths]
    if len(original_names) != len(paths):
        raise DatasetStoreError(f"got {len(paths)} files but {len(original_names)} original names; "
                                "pass one name per file (or none)")
    # Browsers and zip tools may include folders: keep only the last part, on either kind of separator.
    return [(p, str(n).replace("\\", "/").rsplit("/", 1)[-1]) for p, n in zip(paths, original_names, strict=True)]


def _bad_upload_name_reason(name: str) -> str:
    if not name:
        return "the file has no name; rename it and upload it again"
    return "the file name starts with '.', so the dataset would hide it; rename it and upload it again"


def _import_image(folder: Path, index: dict[str, list[Path]], src: Path, name: str,
                  batch: set[Path]) -> tuple[Path, str]:
    """Validate one uploaded image by decoding it, then copy its bytes in: (its path in the dataset, "added",
    "replaced" or "unchanged")."""
    if any(ord(c) < 32 for c in name):
        raise _Rejected("the file name contains control characters; rename it and upload it again")
    try:
        load_image(src, max_side=1024).close()  # decodes every byte (a truncated file fails), giant ones small
    except ImageError as e:
        hint = "" if is_image_extension(name) else "; only images and .txt captions can be imported"
        raise _Rejected(e.reason + hint) from e
    if not is_image_extension(name):
        # The engine would read it, but list_images (by extension) would never show it.
        raise _Rejected(f"it is an image, but {Path(name).suffix or 'no extension'!r} is not an image file "
                        "extension; rename it to .png or .jpg and upload it again")
    try:
        return _place_image(folder, index, src, name, batch)
    except OSError as e:
        raise _Rejected(f"could not copy it into the dataset ({e.strerror or e}); "
                        "check the free disk space and the folder's permissions") from e


def _place_image(folder: Path, index: dict[str, list[Path]], src: Path, name: str,
                 batch: set[Path]) -> tuple[Path, str]:
    """Copy ``src`` in as ``name``: (its path, how).

    * The very same picture (same bytes) already there under a candidate stem is kept as it is ("unchanged"),
      so importing the same files twice is harmless.
    * A different picture under exactly this name (an edited picture dropped again) is replaced ("replaced"):
      the old one goes to ``.removed/`` (restorable), its caption stays for the new one unless a new caption
      comes with the upload.
    * Otherwise a name whose stem another image holds (a.jpg beside a.png, A.png beside a.png: they would share
      a caption) becomes ``stem (2).ext``...
    """
    stem, suffix = Path(name).stem, Path(name).suffix
    digest: str | None = None
    n = 1
    while True:
        candidate = stem if n == 1 else f"{stem} ({n})"
        holders = index.get(stem_key(candidate), [])
        if not holders:
            dest = folder / f"{candidate}{suffix}"
            _copy_file(src, dest)
            index.setdefault(stem_key(candidate), []).append(dest)
            return dest, "added"
        digest = digest or file_digest(src)
        for held in holders:
            if _same_bytes(held, src, digest):
                return held, "unchanged"
        same_name = [held for held in holders if held.name == name and held not in batch]
        if n == 1 and len(holders) == 1 and same_name:
            to_trash(folder, same_name[0], keep_caption=True)
            _copy_file(src, same_name[0])
            return same_name[0], "replaced"
        n += 1


def _same_bytes(path: Path, src: Path, src_digest: str) -> bool:
    """True if ``path`` holds exactly the bytes of ``src`` (sizes first: cheap, and usually decisive)."""
    return path.stat().st_size == src.stat().st_size and file_digest(path) == src_digest


def _copy_file(src: Path, dest: Path) -> None:
    """Copy the original bytes (never re-encoded) atomically; the source is only read."""

    def copy(tmp: Path) -> None:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
            fout.flush()
            os.fsync(fout.fileno())

    fsutil.write_with(dest, copy)


def _import_caption(folder: Path, index: dict[str, list[Path]], stored: dict[str, str],
                    failed: dict[str, str], src: Path, name: str) -> str:
    """Store an uploaded caption beside its image; return the caption's stored name.

    The image is looked up in this upload first (under the stem it was
    stored as, which may have gained a " (2)"), then among the images already
    in the dataset. An uploaded caption replaces the image's old one.
    """
    key = stem_key(Path(name).stem)
    if key in stored:
        stem = stored[key]
    elif index.get(key):
        stem = index[key][0].stem
    elif key in failed:
        raise _Rejected(f"its image {failed[key]!r} was rejected, so the caption has nothing to describe")
    else:
        raise _Rejected(f"no image named {Path(name).stem!r} in the upload or the dataset; "
                        "upload the caption together with its image")
    text = _read_uploaded_caption(src)
    dest = caption_path(folder / stem)
    try:
        fsutil.write_text(dest, text)
    except OSError as e:
        raise _Rejected(f"could not write the caption ({e.strerror or e}); check the free disk space") from e
    return dest.name


def _read_uploaded_caption(src: Path) -> str:
    """Read a caption file as text, refusing files that are clearly not captions."""
    try:
        size = src.stat().st_size
        if size > MAX_CAPTION_BYTES:
            raise _Rejected(f"the file is {size:,} bytes, too large for a caption (at most "
                            f"{MAX_CAPTION_BYTES:,}); a caption is one line of text")
        data = src.read_bytes()
    except OSError as e:
        raise _Rejected(f"cannot read the file ({e.strerror or e})") from e
    if b"\0" in data:
        raise _Rejected("it is not a text file (it contains binary data); a caption is plain text")
    return decode_caption(data).strip()


# --------------------------------------------------------------------------
# listing


@dataclass
class DatasetImage:
    name: str  # file name in the dataset
    path: Path
    caption: str  # "" if none; whitespace collapsed into one line, as the engine reads it
    has_caption: bool  # a caption file exists and is not blank


def list_images(dataset_dir: str | os.PathLike, recursive: bool = False,
                caption_extension: str = CAPTION_EXTENSION) -> list[DatasetImage]:
    """The folder's pictures with their captions, sorted by name (case-insensitive).

    Pictures are recognised by extension only and never decoded, so a folder
    of thousands lists instantly; ``import_files`` already decoded each one.
    Only the folder itself unless ``recursive`` (then ``name`` is the path
    below it, "concept/a.png"); hidden entries, ``.removed/`` among them, are
    skipped (see core.data.dataset.candidate_files, the one lister).
    """
    folder = existing_dir(dataset_dir)
    images = []
    for path in picture_files(folder, caption_extension, recursive):
        caption_file = caption_path(path, caption_extension)
        caption = read_caption(caption_file) if caption_file.is_file() else ""
        images.append(DatasetImage(path.relative_to(folder).as_posix(), path, caption, bool(caption)))
    return sorted(images, key=lambda image: sort_key(image.name))


def counts(dataset_dir: str | os.PathLike) -> dict:
    """How many images there are, and how many do and do not have a non-blank caption."""
    images = list_images(dataset_dir)
    captioned = sum(image.has_caption for image in images)
    return {"images": len(images), "captioned": captioned, "uncaptioned": len(images) - captioned}
