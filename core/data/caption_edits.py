"""Editing the captions of an app-owned dataset: one caption, or all of them at once.

Every caption is written atomically as UTF-8 beside its image; the bulk
tools edit each caption file once and report how many they changed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from core import fsutil
from core.data.dataset import decode_caption
from core.data.dataset_files import (
    DatasetStoreError,
    caption_file_name,
    existing_dir,
    image_in,
    sort_key,
    visible_files,
)
from core.data.images import is_image_extension

_SEPARATORS = " ,\t\r\n"  # what may sit between a caption and an added tag


def save_caption(dataset_dir: str | os.PathLike, image_name: str, text: str) -> Path:
    """Write an image's caption (UTF-8, stripped) atomically beside it; return the caption path."""
    image = image_in(existing_dir(dataset_dir), image_name)
    caption = image.with_name(caption_file_name(image.name))
    fsutil.write_text(caption, (text or "").strip())
    return caption


def add_trigger_word(dataset_dir: str | os.PathLike, word: str) -> int:
    """Put ``word`` first in every caption that does not already start with it; return how many changed.

    "Starts with it" means the first comma-separated tag equals the word,
    ignoring case (CLIP lowercases prompts, so ``SKS`` and ``sks`` are the
    same token). Running it twice changes nothing the second time. Images
    without a caption get the word alone.
    """
    word = _clean_addition(word, "trigger word")
    if "," in word:
        raise DatasetStoreError(f"the trigger word {word!r} contains a comma; use a single tag such as 'sks'")

    def edit(text: str) -> str:
        tags = _tags(text)
        if tags and tags[0].casefold() == word.casefold():
            return text
        return _join(word, text)

    return _edit_captions(dataset_dir, edit)


def find_replace(dataset_dir: str | os.PathLike, find: str, replace: str) -> int:
    """Replace plain text (not a regex) in every caption; return how many captions changed."""
    if not find:
        raise DatasetStoreError("the text to find is empty; type the text to replace")
    replace = replace or ""
    return _edit_captions(dataset_dir, lambda text: text.replace(find, replace).strip() if find in text else text)


def add_text(dataset_dir: str | os.PathLike, text: str, where: Literal["prepend", "append"]) -> int:
    """Add text at the start or the end of every caption, joined with ", "; return how many changed.

    Separators the user typed (", high quality") and those already at the
    caption's end ("a dog, ") are not doubled. A caption whose first (or
    last) tags already are exactly the text is left alone, so repeating
    the action is harmless. Empty captions become just the text.
    """
    if where not in ("prepend", "append"):
        raise DatasetStoreError(f"where must be 'prepend' or 'append', got {where!r}")
    text = _clean_addition(text, "text to add")
    added = _tags(text)

    def edit(caption: str) -> str:
        tags = _tags(caption)
        if where == "prepend":
            return caption if tags[: len(added)] == added else _join(text, caption)
        return caption if len(tags) >= len(added) and tags[-len(added):] == added else _join(caption, text)

    return _edit_captions(dataset_dir, edit)


def _clean_addition(text: str, what: str) -> str:
    """Strip spaces and stray commas from text to add; refuse if nothing is left."""
    clean = (text or "").strip(_SEPARATORS)
    if not clean:
        raise DatasetStoreError(f"the {what} is empty; type some text first")
    return clean


def _tags(text: str) -> list[str]:
    """The comma-separated tags of a caption, stripped, empty ones dropped."""
    return [tag.strip() for tag in text.split(",") if tag.strip()]


def _join(first: str, second: str) -> str:
    """``first, second`` without doubled separators; either side may be empty."""
    first, second = first.rstrip(_SEPARATORS), second.lstrip(_SEPARATORS)
    return f"{first}, {second}" if first and second else first or second


def _edit_captions(dataset_dir: str | os.PathLike, edit: Callable[[str], str]) -> int:
    """Apply ``edit`` to every image's caption (stripped; "" if none) and write those that change.

    Each caption file is edited once even when two images share it (``a.png``
    and ``a.jpg`` both read ``a.txt``), so a replacement is never applied twice.
    """
    folder = existing_dir(dataset_dir)
    files = visible_files(folder)
    seen: set[str] = set()
    changed = 0
    for name in sorted((n for n in files if is_image_extension(n)), key=sort_key):
        caption_name = caption_file_name(name)
        if caption_name in seen:
            continue
        seen.add(caption_name)
        old = decode_caption(files[caption_name].read_bytes()).strip() if caption_name in files else ""
        new = edit(old)
        if new != old:
            fsutil.write_text(folder / caption_name, new)
            changed += 1
    return changed
