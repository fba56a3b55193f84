"""The files of an app-owned dataset folder: plain names, stems, the caption beside each picture, and the
hidden ``.removed/`` folder that removing a picture moves it (and its caption) to, and restoring brings it
back from. ``core.data.dataset_store`` builds the dataset operations on these; no gradio here.
"""

from __future__ import annotations

import json
import logging
import os
import unicodedata
from pathlib import Path

from core import fsutil
from core.data.dataset import CAPTION_EXTENSION, caption_path
from core.data.images import is_image_extension

log = logging.getLogger(__name__)

REMOVED_DIR = ".removed"  # hidden, so scan_dataset and list_images skip it
# Inside REMOVED_DIR: {name in .removed: name it had in the dataset}, so undo restores the original name.
_REMOVED_INDEX = ".names.json"


class DatasetStoreError(ValueError):
    """A dataset operation that cannot be done; the message says what was wrong and what to do."""


def list_removed(dataset_dir: str | os.PathLike) -> list[str]:
    """Names of the images in ``.removed/`` (what ``restore_image`` accepts), sorted."""
    trash = existing_dir(dataset_dir) / REMOVED_DIR
    if not trash.is_dir():
        return []
    return sorted((n for n in visible_files(trash) if is_image_extension(n)), key=sort_key)


# --------------------------------------------------------------------------
# removing and restoring


def remove_image(dataset_dir: str | os.PathLike, image_name: str) -> Path:
    """Move an image and its caption into the hidden ``.removed/`` folder; return the image's new path.

    Nothing is deleted, so a removal can be undone with ``restore_image``.
    If ``.removed/`` already holds that stem, the image gets a " (2)" suffix
    there; the name it had in the dataset is recorded for the restore.
    """
    folder = existing_dir(dataset_dir)
    return to_trash(folder, image_in(folder, image_name))


def to_trash(folder: Path, image: Path, keep_caption: bool = False) -> Path:
    """Move ``image`` (and its caption, unless ``keep_caption``: then a copy) into ``.removed/``."""
    trash = folder / REMOVED_DIR
    trash.mkdir(exist_ok=True)
    dest = trash / free_name(trash, image.name)
    caption = image.with_name(caption_file_name(image.name))
    # Image first: a crash in between leaves an orphan caption (ignored), never an uncaptioned image.
    os.replace(image, dest)
    if caption.is_file():
        dest_caption = dest.with_name(caption_file_name(dest.name))
        if keep_caption or any(caption_file_name(p.name) == caption.name
                               for p in stem_holders(folder, image.stem)):
            # Another image (a.jpg beside a.png) still reads this caption: leave it, and keep a copy.
            fsutil.write_bytes(dest_caption, caption.read_bytes())
        else:
            os.replace(caption, dest_caption)
    names = _read_removed_index(trash)
    names[dest.name] = image.name
    fsutil.write_json(trash / _REMOVED_INDEX, names)
    return dest


def restore_image(dataset_dir: str | os.PathLike, image_name: str) -> Path:
    """Move a removed image (``image_name`` as named in ``.removed/``) and its caption back; return its path.

    It returns under the name it had before removal. Raises if an image
    with that stem, or its caption file, is back in the dataset meanwhile:
    restoring would then overwrite or mix up files.
    """
    folder = existing_dir(dataset_dir)
    trash = folder / REMOVED_DIR
    name = plain_name(image_name)
    src = trash / name
    if not src.is_file():
        raise DatasetStoreError(f"there is no removed image named {name!r} in {trash}; refresh the list")
    names = _read_removed_index(trash)
    target = folder / names.get(name, name)
    src_caption = src.with_name(caption_file_name(src.name))
    target_caption = target.with_name(caption_file_name(target.name))
    if target.exists() or stem_holders(folder, target.stem):
        raise DatasetStoreError(f"cannot restore {name!r}: the dataset already has an image named like "
                                f"{target.name!r}; rename or remove that image first")
    if src_caption.is_file() and target_caption.exists():
        raise DatasetStoreError(f"cannot restore {name!r}: {target_caption.name!r} is already in the dataset; "
                                "move that caption file away first")
    os.replace(src, target)
    if src_caption.is_file():
        os.replace(src_caption, target_caption)
    names.pop(name, None)
    fsutil.write_json(trash / _REMOVED_INDEX, names)
    return target


def free_name(folder: Path, name: str) -> str:
    """``name``, or ``stem (2).ext``... : the first whose stem no file in ``folder`` uses (captions included)."""
    stem, suffix = Path(name).stem, Path(name).suffix
    used = {stem_key(Path(n).stem) for n in visible_files(folder)}
    n = 1
    while stem_key(stem if n == 1 else f"{stem} ({n})") in used:
        n += 1
    return name if n == 1 else f"{stem} ({n}){suffix}"


def _read_removed_index(trash: Path) -> dict[str, str]:
    """The removed-name -> original-name record; a damaged one is ignored (names are then kept as they are)."""
    path = trash / _REMOVED_INDEX
    if not path.is_file():
        return {}
    try:
        names = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable %s (%s): removed images restore under their current names", path, e)
        return {}
    if not isinstance(names, dict):
        return {}
    return {str(k): str(v) for k, v in names.items()}


# --------------------------------------------------------------------------
# shared helpers


def existing_dir(dataset_dir: str | os.PathLike) -> Path:
    folder = Path(dataset_dir)
    if not folder.is_dir():
        raise DatasetStoreError(f"dataset folder {folder} does not exist; create the dataset first")
    return folder


def plain_name(name: str) -> str:
    """Refuse anything but a plain, visible file name, so no caller can reach outside the dataset."""
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or name.startswith(".") or any(ord(c) < 32 for c in name)):
        raise DatasetStoreError(f"{name!r} is not a plain file name in the dataset; pick an image from the list")
    return name


def image_in(folder: Path, image_name: str) -> Path:
    """The path of an image that exists directly in ``folder``."""
    path = folder / plain_name(image_name)
    if not is_image_extension(path) or not path.is_file():
        raise DatasetStoreError(f"there is no image named {image_name!r} in {folder}; refresh the list")
    return path


def visible_files(folder: Path) -> dict[str, Path]:
    """Plain files directly in ``folder`` by name, hidden ones (temporary files, .DS_Store) skipped.

    A link is listed only if it points to a file inside ``folder`` (see core.data.dataset.link_problem):
    the gallery serves what is listed here, and must never serve a file from elsewhere.
    """
    from core.data.dataset import link_problem

    with os.scandir(folder) as entries:
        return {e.name: Path(e.path) for e in entries
                if not e.name.startswith(".") and link_problem(Path(e.path), folder) is None and e.is_file()}


def stem_index(folder: Path) -> dict[str, list[Path]]:
    """Images in ``folder`` grouped by stem key: who holds each caption name."""
    index: dict[str, list[Path]] = {}
    for name, path in sorted(visible_files(folder).items()):
        if is_image_extension(name):
            index.setdefault(stem_key(Path(name).stem), []).append(path)
    return index


def stem_holders(folder: Path, stem: str) -> list[Path]:
    return stem_index(folder).get(stem_key(stem), [])


def caption_file_name(image_name: str) -> str:
    """``a.png`` -> ``a.txt``: the caption the app's datasets keep beside a picture (core.data.dataset's rule)."""
    return caption_path(Path(image_name)).name


def is_caption_name(name: str) -> bool:
    return Path(name).suffix.lower() == CAPTION_EXTENSION


def stem_key(stem: str) -> str:
    """Compare stems as case-insensitive file systems (and macOS's decomposed accents) do."""
    return unicodedata.normalize("NFC", stem).casefold()


def sort_key(name: str) -> tuple[str, str]:
    return name.casefold(), name
