"""Atomic file writing: every file the app writes goes through here.

A file is written to a temporary sibling and moved into place with
``os.replace``, so a crash or a kill never leaves a half-written file where a
reader (the UI, A1111, a resumed run) expects a whole one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it onto ``path`` on success.

    The caller writes the temporary path with any library (safetensors,
    Pillow, ...). If the block raises, the temporary file is removed and the
    old ``path`` (if any) is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Keep the real suffix last: some writers (Pillow) pick the format by it.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_with(path: str | os.PathLike, writer: Callable[[Path], None]) -> None:
    """Atomically write ``path`` with ``writer(tmp_path)`` (e.g. ``image.save``)."""
    with atomic_path(path) as tmp:
        writer(tmp)


def save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def save_image(path: str | os.PathLike, image) -> None:
    """Save a PIL image atomically; the format follows ``path``'s extension."""
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(Path(path).suffix.lower(), "PNG")
    write_with(path, lambda tmp: image.save(tmp, format=fmt))


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line to a log in a single ``write`` call.

    Append-only logs (``events.jsonl``) cannot be replaced atomically on every
    line; one ``write`` of a whole line in append mode is the equivalent: a
    reader sees whole lines, or a last line without its newline, which
    ``core.events.read_events`` ignores.
    """
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    fd = os.open(os.fspath(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


@contextlib.contextmanager
def new_folder(directory: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling folder; rename it to ``directory`` when the block succeeds.

    For writers that produce a whole folder (a model, a captioner): an
    interrupted write never leaves a half-written folder under the real name.
    ``directory`` must not exist or be empty.
    """
    import shutil

    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise FileExistsError(f"{directory} already exists and is not an empty folder; choose a new folder")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        yield tmp
        if directory.exists():
            directory.rmdir()
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
