"""Automatic captions: a captioning model writes a ``.txt`` beside every image in a folder.

``python -m core caption DIR --captioner blip|wd14|florence2 --model PATH_OR_HUB_ID``
runs ``caption_folder``; the app starts that same command as a subprocess and
polls its ``--events`` file, exactly as it does for training.

Three captioners, one per kind of caption a LoRA is trained on:

* ``blip`` (``core.captioning.caption_blip``): one short English sentence per picture;
* ``wd14`` (``core.captioning.caption_tagger``): booru-style tags from a WD tagger run
  with onnxruntime, for anime-style models;
* ``florence2`` (``core.captioning.caption_florence``): Florence-2's detailed
  paragraphs, for models trained on long natural-language prompts.

The job, in order:

1. list the folder's images (top level, as the Dataset tab shows them) and
   keep the ones that have no caption yet (all of them with ``overwrite``);
2. load the captioner (skipped when there is nothing to do);
3. per batch: decode the pictures with ``core.data.images.load_image`` (so CMYK,
   16-bit and EXIF-rotated files come out right), caption them, put the
   trigger word first, and write each caption atomically. A file that
   cannot be decoded is reported in ``failed`` and the job goes on;
4. free the model and report.

``should_stop()`` is checked between batches, so a stop never leaves a
half-written caption. Captioners are small ``CaptionerBase`` classes named in
``CAPTIONERS``, with ``caption(images) -> list[str]`` and ``close()``; their
own options (a tagger's thresholds, Florence-2's task) are checked before any
work starts. Heavy libraries (torch, transformers, onnxruntime) are imported
only inside them.
"""

from __future__ import annotations

import gc
import importlib
import os
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from core import fsutil
from core.data.dataset import CAPTION_EXTENSION, caption_path
from core.events import CaptionFinished, CaptionProgress, Event, Message, Phase

if TYPE_CHECKING:
    from core.data.dataset_store import DatasetImage

DEFAULT_BLIP = "Salesforce/blip-image-captioning-base"
# A hub id: "name" or "owner/name" (letters, digits, "-", "_", "."); anything else must be a folder.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
# What may follow a trigger word at the start of a caption for it to count as already there.
_WORD_END = " ,;:."
# ASCII control characters other than whitespace (a random-weight model can emit them).
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class CaptionError(RuntimeError):
    """The captioning job cannot run; the message says what was wrong and what to do.

    ``kind`` is the ``core.events.RunError`` kind: "config" (bad option),
    "dataset" (the image folder) or "model" (the captioner's model).
    """

    def __init__(self, message: str, kind: str = "model"):
        super().__init__(message)
        self.kind = kind


# --------------------------------------------------------------------------
# events (core.events; the CLI writes them to --events FILE; the app polls that file)


def terminal_line(event: Event) -> str | None:
    """The line the command prints for an event (None for events it does not show)."""
    kind = event.type
    if kind == "phase":
        return f"{event.name}..."
    if kind == "message":
        return f"{event.level}: {event.text}"
    if kind == "caption_progress":
        text = f"failed: {event.error}" if event.error else event.caption
        return f"{event.done}/{event.total} {event.image}: {text}"
    if kind == "caption_finished":
        line = (f"wrote {len(event.written)} caption(s), kept {len(event.skipped)} existing, "
                f"{len(event.failed)} failed")
        return line + (" (stopped early)" if event.stopped else "")
    return None


# --------------------------------------------------------------------------
# captioners


class CaptionerBase:
    """What every captioner shares: its name, default model, options and their checks.

    A subclass loads its model in ``__init__(model, device=None, **options)``
    (raising ``CaptionError`` with what to do), captions RGB pictures with
    ``caption(images, max_new_tokens=None) -> list[str]`` and frees its model
    in ``close()``. The class methods run before a job starts, so a bad option
    or a missing model folder fails before any picture is read.
    """

    name: ClassVar[str] = ""
    default_model: ClassVar[str] = ""  # what the command line uses when no --model is given
    suggested_model: ClassVar[str] = ""  # what the app offers first (better captions, a larger download)
    options: ClassVar[dict[str, Any]] = {}  # option name -> default value
    default_max_new_tokens: ClassVar[int | None] = None  # None: it does not generate text
    # Why a picture got no caption, for the job's report.
    empty_reason: ClassVar[str] = "the captioner returned no text for it"

    @classmethod
    def check_model(cls, model: str) -> None:
        """Raise ``CaptionError`` now for a model path that cannot work (a hub id is checked at load)."""
        model_source(model or cls.default_model, cls.default_model)

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        """The options with defaults filled in; ``CaptionError`` for one this captioner does not have."""
        for key in options:
            if key not in cls.options:
                owners = [name for name in sorted(CAPTIONERS) if key in captioner_class(name).options]
                where = f"it belongs to the {' and '.join(owners)} captioner" if owners else "no captioner has it"
                raise CaptionError(f"the {cls.name} captioner has no option {_flag(key)} ({where})", kind="config")
        return {**cls.options, **options}

    @staticmethod
    def write_tiny(directory: str | os.PathLike, seed: int = 0) -> Path:
        """Write a random-weight model of this kind (for tests and the demo) and return its folder."""
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Free the model (and the GPU memory it held); the captioner cannot be used afterwards.

        This default serves the transformers captioners (``model`` + ``processor``); others override it.
        """
        if getattr(self, "model", None) is None:
            return
        self.model = self.processor = None
        free_memory(self.device)


def _flag(option: str) -> str:
    """An option's command-line spelling: character_threshold -> --character-threshold."""
    return "--" + option.replace("_", "-")


# name -> "module:class"; a captioner's module (and its libraries) is imported only when it is used.
CAPTIONERS: dict[str, str] = {
    "blip": "core.captioning.caption_blip:BlipCaptioner",
    "wd14": "core.captioning.caption_tagger:WdTagger",
    "florence2": "core.captioning.caption_florence:Florence2Captioner",
}


def captioner_class(name: str) -> type[CaptionerBase]:
    """The captioner class registered as ``name``; ``CaptionError`` listing the known ones otherwise."""
    if name not in CAPTIONERS:
        raise CaptionError(f"unknown captioner {name!r}; choose one of: {', '.join(sorted(CAPTIONERS))}",
                           kind="config")
    module, cls = CAPTIONERS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def free_memory(device) -> None:
    """Give back what a closed model held (the GPU cache too, when it ran on the GPU)."""
    gc.collect()
    if getattr(device, "type", device) == "cuda":
        import torch

        torch.cuda.empty_cache()


def check_all_weights(info: dict, model: str, what: str, default_model: str) -> None:
    """Refuse a model that loaded with some weights left random (its captions would be noise)."""
    missing = info.get("missing_keys") or []
    if missing:
        raise CaptionError(f"the captioner model {model} lacks {len(missing)} weight(s) "
                           f"(e.g. {sorted(missing)[0]}); the download is incomplete or it is not {what}. "
                           f"Download it again, e.g. {download_hint(model, default_model)}")


def pick_device(device: str | None):
    import torch

    if not device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise CaptionError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'", kind="config") from e
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise CaptionError(f"device {device!r} was asked for, but this torch sees no NVIDIA GPU; "
                           "use --device cpu or install the CUDA build of torch", kind="config")
    return chosen


def is_hub_id(model: str) -> bool:
    return bool(_HUB_ID.fullmatch(model)) and ".." not in model


def model_source(model: str, default_model: str = DEFAULT_BLIP, files: str = "config.json and weights",
                 download: str = "") -> str:
    """A local folder (as a path string) or a hub id; raise for a path that is neither.

    ``files`` names what the folder holds, ``download`` the files to download (see ``download_hint``).
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise CaptionError(f"the captioner model {model} is a file; pass the folder that holds its {files}")
    if is_hub_id(model):
        return model
    raise CaptionError(f"there is no captioner model folder {path}; download one, e.g. "
                       f"{download_hint(default_model, default_model, download)}, "
                       f"or pass a hub id such as {default_model}")


def load_failure(model: str, error: Exception, what: str, default_model: str = DEFAULT_BLIP, files: str = "") -> str:
    """Why a model did not load and what to do; ``what`` says what its folder must hold."""
    detail = " ".join(str(error).split()).rstrip(".")
    hint = download_hint(model, default_model, files)
    if Path(model).expanduser().is_dir():
        return (f"cannot load the captioner from the folder {model}: {detail}. It must hold {what}; "
                f"download one, e.g. {hint}")
    from huggingface_hub import is_offline_mode

    if is_offline_mode():
        return (f"cannot load the captioner model {model!r}: there is no such folder here, it is not in the "
                f"Hugging Face cache, and downloads are off (HF_HUB_OFFLINE is set). Download it into models/ "
                f"once on a machine with internet access: {hint}")
    return (f"cannot load the captioner model {model!r} ({detail}); check the name and the internet "
            f"connection, or download it into models/: {hint}")


def download_hint(model: str, default_model: str = DEFAULT_BLIP, files: str = "") -> str:
    """The command that puts ``model`` (a hub id, else ``default_model``) into models/, and how to use it.

    ``files``: the file names to download, space-separated ("" for the whole repository).
    """
    hub_id = model if is_hub_id(model) and "/" in model else default_model
    folder = f"models/{hub_id.split('/')[-1]}"
    return f"`hf download {hub_id}{' ' + files if files else ''} --local-dir {folder}` then --model {folder}"


# --------------------------------------------------------------------------
# captioning a folder


@dataclass
class CaptionReport:
    written: list[str] = field(default_factory=list)  # image names whose caption was written
    skipped: list[str] = field(default_factory=list)  # image names that kept their existing caption
    failed: list[tuple[str, str]] = field(default_factory=list)  # (image name, reason)


def caption_folder(folder: str | os.PathLike, captioner: str = "blip", model: str = "", prefix: str = "",
                   overwrite: bool = False, batch_size: int = 4, emit: Callable[[Event], None] | None = None,
                   should_stop: Callable[[], bool] | None = None, device: str | None = None,
                   max_new_tokens: int | None = None, options: dict[str, Any] | None = None,
                   caption_extension: str = CAPTION_EXTENSION) -> CaptionReport:
    """Caption every picture of ``folder`` and its subfolders (as training reads them) that has no caption
    yet (every one with ``overwrite``).

    Each caption is written beside its image as UTF-8 ``<stem><caption_extension>``, with
    ``prefix`` (a trigger word) first: "prefix, caption". ``captioner`` is a
    name in ``CAPTIONERS``, ``model`` a folder or hub id ("" picks the
    captioner's default), ``device`` e.g. "cpu" or "cuda" (None: the GPU if
    there is one), ``max_new_tokens`` the caption length limit of the text
    captioners (None: the captioner's default), ``options`` the captioner's
    own options (e.g. ``{"threshold": 0.5}`` for wd14). Raises
    ``CaptionError`` before any captioning for a bad option, a missing
    folder or a model that cannot load; per-image problems go to ``failed``.
    Events: a Message if captioned images are kept, Phase("loading
    captioner") when a model is needed, one CaptionProgress per image
    worked on, and a CaptionFinished at the end (also when stopped).
    """
    emit = emit or _ignore
    should_stop = should_stop or _never
    kind = captioner_class(captioner)
    if batch_size < 1:
        raise CaptionError(f"batch size must be at least 1, got {batch_size}", kind="config")
    if max_new_tokens is not None:
        if kind.default_max_new_tokens is None:
            raise CaptionError(f"the {kind.name} captioner writes tags, not text: --max-new-tokens does not "
                               "apply to it", kind="config")
        if max_new_tokens < 1:
            raise CaptionError(f"max new tokens must be at least 1, got {max_new_tokens}", kind="config")
    options = kind.check_options(dict(options or {}))
    if model:
        kind.check_model(model)  # a missing folder fails now, not after the folder is scanned
    todo, report = _plan(folder, overwrite, caption_extension)
    if report.skipped:
        emit(Message("info", f"{len(report.skipped)} image(s) already have a caption and keep it "
                             "(overwrite replaces them)"))
    stopped = False
    if todo:
        emit(Phase("loading captioner", 0, 0))
        engine = kind(model, device=device, **options)
        try:
            stopped = _caption_all(engine, todo, _clean_prefix(prefix), batch_size, max_new_tokens,
                                   report, emit, should_stop, caption_extension)
        finally:
            engine.close()
    emit(CaptionFinished(list(report.written), list(report.skipped), list(report.failed), stopped))
    return report


def _ignore(event: Event) -> None:
    pass


def _never() -> bool:
    return False


def _plan(folder: str | os.PathLike, overwrite: bool,
          caption_extension: str = CAPTION_EXTENSION) -> tuple[list[DatasetImage], CaptionReport]:
    """The images to caption (subfolders included), and a report already holding the skipped ones."""
    from core.data.dataset_store import list_images

    if not Path(folder).is_dir():
        raise CaptionError(f"image folder {folder} does not exist; pass the folder that holds the images",
                           kind="dataset")
    report = CaptionReport()
    todo = []
    owners: dict[str, str] = {}  # caption file key -> image that owns it
    for image in list_images(folder, recursive=True, caption_extension=caption_extension):
        # a.png and a.jpg would share a.txt (A.txt and a.txt are one file on Windows and macOS).
        key = unicodedata.normalize("NFC", str(caption_path(image.path, caption_extension))).casefold()
        if key in owners:
            report.failed.append((image.name, f"it would share its caption file "
                                              f"{caption_path(image.path, caption_extension).name} with "
                                              f"{owners[key]}; rename one of the two"))
            continue
        owners[key] = image.name
        if image.has_caption and not overwrite:
            report.skipped.append(image.name)
        else:
            todo.append(image)
    return todo, report


def _caption_all(engine: CaptionerBase, todo: list[DatasetImage], prefix: str, batch_size: int,
                 max_new_tokens: int | None, report: CaptionReport, emit, should_stop,
                 caption_extension: str = CAPTION_EXTENSION) -> bool:
    """Caption ``todo`` batch by batch; return True if stopped before the end."""
    from core.data.images import ImageError, load_image

    total, done = len(todo), 0

    def failed(name: str, reason: str) -> None:
        nonlocal done
        done += 1
        report.failed.append((name, reason))
        emit(CaptionProgress(done, total, name, "", error=reason))

    for start in range(0, total, batch_size):
        if should_stop():
            return True
        batch, pictures = [], []
        for image in todo[start:start + batch_size]:
            try:
                pictures.append(load_image(image.path, max_side=1024))  # captioners see 384-1024 px
                batch.append(image)
            except ImageError as e:
                failed(image.name, e.reason)
        captions = engine.caption(pictures, max_new_tokens=max_new_tokens) if pictures else []
        for picture in pictures:
            picture.close()
        for image, text in zip(batch, captions, strict=True):
            text = clean_caption(text)
            if not text:
                failed(image.name, engine.empty_reason)
                continue
            text = with_prefix(text, prefix)
            try:
                fsutil.write_text(caption_path(image.path, caption_extension), text)
            except OSError as e:
                failed(image.name, f"could not write its caption ({e.strerror or e}); check the folder's "
                                   "permissions and free space")
                continue
            done += 1
            report.written.append(image.name)
            emit(CaptionProgress(done, total, image.name, text))
    return False


def clean_caption(text: str) -> str:
    """One line, single spaces, no leading or trailing space, no control characters."""
    return " ".join(_CONTROL.sub("", text or "").split())


def _clean_prefix(prefix: str) -> str:
    return clean_caption(prefix).strip(" ,")


def with_prefix(caption: str, prefix: str) -> str:
    """``prefix, caption``, unless the caption already starts with the prefix as a whole word (any case)."""
    if not prefix:
        return caption
    head, rest = caption[:len(prefix)], caption[len(prefix):]
    if head.casefold() == prefix.casefold() and (not rest or rest[0] in _WORD_END):
        return caption
    return f"{prefix}, {caption}"


def write_tiny_captioner(directory: str | os.PathLike, kind: str = "blip", seed: int = 0) -> Path:
    """Write a random-weight captioner of ``kind`` (blip, wd14 or florence2) for tests and the demo."""
    return captioner_class(kind).write_tiny(directory, seed)
