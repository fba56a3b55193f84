"""Atomic file writing: every file the app writes goes through here.

A file is written to a temporary sibling and moved into place with
``os.replace``, so a crash or a kill never leaves a half-written file where a
reader (the UI, A1111, a resumed run) expects a whole one. Files that hours of
training stand behind (LoRA files, resume state) are also *durable*: flushed to
the disk before the rename and the rename flushed after it, so a power cut
cannot leave an empty file under the real name either.

Files get the permissions any program gives new files (0666 less the user's
umask), not the private 0600 of a temporary file.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

TEMP_MARK = ".tmp"  # in the name of every temporary file and folder written here (see is_temporary)


@functools.cache
def _umask() -> int:
    # os.umask can only be read by setting it; done once, before the app starts threads that create files.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a new file gets from open(): 0666 less the user's umask."""
    return 0o666 & ~_umask()


def folder_mode() -> int:
    return 0o777 & ~_umask()


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file (or a folder's entries) to the disk; folders cannot be opened on Windows and are skipped."""
    path = Path(path)
    if path.is_dir() and os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: str | os.PathLike) -> None:
    """Flush every file under ``folder``, then the folders themselves (before renaming it into place)."""
    folder = Path(folder)
    for root, _dirs, files in os.walk(folder):
        for name in files:
            fsync_path(Path(root) / name)
        fsync_path(root)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it onto ``path`` on success.

    The caller writes the temporary path with any library (safetensors,
    Pillow, ...). If the block raises, the temporary file is removed and the
    old ``path`` (if any) is left untouched. ``durable`` flushes the file
    before the rename and the folder after it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Keep the real suffix last: some writers (Pillow) pick the format by it.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f"{TEMP_MARK}{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, file_mode())
        if durable:
            fsync_path(tmp_path)
        os.replace(tmp_path, path)
        if durable:
            fsync_path(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def is_temporary(path: str | os.PathLike) -> bool:
    """A temporary file or folder of this module (or any hidden entry): never offered to the user."""
    name = Path(path).name
    return name.startswith(".")


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write_all(f.fileno(), data)
        os.fsync(f.fileno())


def write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte is written (a full disk raises OSError(ENOSPC), never a short file)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(28, "No space left on device (nothing was written)")
        view = view[written:]


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_with(path: str | os.PathLike, writer: Callable[[Path], None], durable: bool = False) -> None:
    """Atomically write ``path`` with ``writer(tmp_path)`` (e.g. ``image.save``)."""
    with atomic_path(path, durable) as tmp:
        writer(tmp)


def save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None,
                     durable: bool = False) -> None:
    """A .safetensors file written atomically; ``durable`` for files worth hours (LoRAs, merged models)."""
    from safetensors.torch import save_file

    write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), durable)


def save_image(path: str | os.PathLike, image) -> None:
    """Save a PIL image atomically; the format follows ``path``'s extension."""
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(Path(path).suffix.lower(), "PNG")
    write_with(path, lambda tmp: image.save(tmp, format=fmt))


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line to a log (``events.jsonl``), whole or not at all as far as readers can tell.

    Append-only logs cannot be replaced atomically on every line. The line
    goes out in one ``write`` in append mode (looping if the system writes
    less, and raising OSError when the disk is full), so a reader sees whole
    lines, or a last line without its newline, which
    ``core.events.read_events`` leaves for later. If an earlier write was cut
    short (a full disk, a kill) the file does not end with a newline; the
    new line then starts on a fresh line, so the cut one stays alone and the
    reader can skip it.
    """
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    fd = os.open(os.fspath(path), os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0), file_mode())
    try:
        size = os.fstat(fd).st_size
        if size:
            os.lseek(fd, size - 1, os.SEEK_SET)
            if os.read(fd, 1) != b"\n":
                data = b"\n" + data
        write_all(fd, data)
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
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=TEMP_MARK, dir=directory.parent))
    os.chmod(tmp, folder_mode())
    try:
        yield tmp
        if directory.exists():
            directory.rmdir()
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
