"""Finding the training images and captions in a folder, and splitting them.

A dataset is a plain folder: images (any format Pillow reads, in any
subfolder) with same-stem caption files beside them. Nothing in it is ever
moved, renamed or written; caches live elsewhere (see ``core.cache``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from core.images import ImageError, is_image_extension, load_image

# Files that are expected beside images and are not images themselves.
SIDECAR_SUFFIXES = {".txt", ".caption", ".json", ".toml", ".yaml", ".yml", ".md", ".npz", ".safetensors"}


class DatasetError(ValueError):
    """The dataset cannot be used; the message says which folder and what to do."""


@dataclass
class ImageItem:
    path: Path
    caption: str
    caption_path: Path | None  # None when the image has no caption file

    @property
    def name(self) -> str:
        return self.path.name


@dataclass
class ScanResult:
    folder: Path
    items: list[ImageItem] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # image files that cannot be read, and why
    ignored: list[Path] = field(default_factory=list)  # other files that are not images
    missing_captions: list[Path] = field(default_factory=list)

    def warnings(self) -> list[str]:
        """Human-readable warnings, one per problem kind, naming the files."""
        out = []
        if self.skipped:
            lines = "; ".join(f"{p.relative_to(self.folder)} ({reason})" for p, reason in self.skipped)
            out.append(f"skipped {len(self.skipped)} unreadable image file(s): {lines}")
        if self.missing_captions:
            names = ", ".join(str(p.relative_to(self.folder)) for p in self.missing_captions)
            out.append(f"{len(self.missing_captions)} image(s) have no caption file and train with an empty "
                       f"caption: {names}")
        if self.ignored:
            names = ", ".join(str(p.relative_to(self.folder)) for p in self.ignored)
            out.append(f"ignored {len(self.ignored)} file(s) that are not images: {names}")
        return out


def scan_dataset(folder: str | Path, caption_extension: str = ".txt") -> ScanResult:
    """Find every readable image under ``folder`` and its caption.

    Every image is fully decoded once here, so truncated or corrupt files are
    reported before any model loads. Hidden files and folders are skipped.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"dataset folder {folder} does not exist or is not a folder")
    result = ScanResult(folder)
    for path in walk_files(folder):
        suffix = path.suffix.lower()
        if suffix == caption_extension.lower() or suffix in SIDECAR_SUFFIXES:
            continue
        try:
            load_image(path).close()
        except ImageError as exc:
            if is_image_extension(path):
                result.skipped.append((path, exc.reason))
            else:
                result.ignored.append(path)
            continue
        caption_path = path.with_suffix(caption_extension)
        if caption_path.is_file():
            result.items.append(ImageItem(path, read_caption(caption_path), caption_path))
        else:
            result.items.append(ImageItem(path, "", None))
            result.missing_captions.append(path)
    return result


def walk_files(folder: Path):
    """All files under folder, sorted, skipping hidden entries (.cache, .DS_Store, ...)."""
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if path.is_file():
            yield path


def read_caption(path: Path) -> str:
    """A caption file as one line of text (UTF-8, with or without BOM)."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        # Captions written by Windows tools are sometimes cp1252.
        text = data.decode("cp1252", errors="replace")
    return " ".join(text.split())


def require_images(scan: ScanResult) -> None:
    """Raise a clear error when nothing in the folder can be trained on."""
    if scan.items:
        return
    detail = ""
    if scan.skipped:
        detail = f"; {len(scan.skipped)} image file(s) could not be read: " + "; ".join(
            f"{p.name} ({reason})" for p, reason in scan.skipped[:5])
    raise DatasetError(f"no readable image in dataset folder {scan.folder}{detail}. Add .png, .jpg or "
                       f".webp images (with same-name .txt captions) and try again")


def split_items(items: list[ImageItem], fraction: float, seed: int) -> tuple[list[ImageItem], list[ImageItem]]:
    """Deterministic train/validation split.

    The same images, seed and fraction always give the same split, whatever
    order the files were found in. With 2+ images and a fraction above 0, at
    least one image is held out and at least one is kept for training.
    """
    ordered = sorted(items, key=lambda item: str(item.path))
    n = len(ordered)
    if fraction <= 0 or n < 2:
        return ordered, []
    n_val = min(n - 1, max(1, round(n * fraction)))
    indices = list(range(n))
    random.Random(seed).shuffle(indices)
    held_out = set(indices[:n_val])
    train = [item for i, item in enumerate(ordered) if i not in held_out]
    val = [item for i, item in enumerate(ordered) if i in held_out]
    return train, val
