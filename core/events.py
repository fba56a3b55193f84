"""Events a training run reports, and the JSON-lines file they are written to.

The engine calls ``emit(event)`` with one of the small dataclasses below. The
command line sends each event to ``events.jsonl`` in the run folder (one JSON
object per line, ``{"type": ..., "time": ..., ...fields}``) and to the
terminal; the app polls that file. Reading it back needs nothing but ``json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Event:
    time: float = field(default_factory=time.time, kw_only=True)

    @property
    def type(self) -> str:
        return _TYPES[type(self)]

    def to_json(self) -> str:
        return json.dumps({"type": self.type, **dataclasses.asdict(self)}, ensure_ascii=False)


@dataclass
class RunStarted(Event):
    run_dir: str
    total_steps: int
    start_step: int
    num_train_images: int
    num_validation_images: int
    batch_size: int
    num_processes: int
    device: str
    resumed: bool = False


@dataclass
class Phase(Event):
    """Work before training: scanning, loading the model, caching (done of total; 0 of 0 when unknown)."""

    name: str
    done: int
    total: int


@dataclass
class Progress(Event):
    step: int
    total_steps: int
    epoch: int
    loss: float
    lr: float
    it_per_s: float
    eta_s: float


@dataclass
class ValidationLoss(Event):
    step: int
    loss: float
    best: bool  # the lowest validation loss of the run so far (of these weights)
    ema: bool = False  # the loss of the moving average of the weights (train.ema), not the live ones


@dataclass
class SampleWritten(Event):
    step: int
    path: str
    prompt: str
    seed: int


@dataclass
class CheckpointSaved(Event):
    step: int
    path: str
    kind: str  # "lora" (an intermediate or final .safetensors) or "state" (resume folder)


@dataclass
class LoraVerified(Event):
    """A saved LoRA file checked against the base model (see core.lora.verify)."""

    step: int
    path: str
    ok: bool
    modules: int  # LoRA modules in the file
    matched: int  # ... that map onto a module of the base model
    problems: list[str]  # unmatched names (first few), shape/alpha problems, load failures, no effect
    mean_change: float | None = None  # pixel change at a fixed seed (0-255), when images were compared
    loads: bool | None = None  # diffusers' loader read it (None: not checked)


@dataclass
class Message(Event):
    level: str  # "info" or "warning"
    text: str


@dataclass
class RunError(Event):
    message: str  # one line that says what went wrong and what to do
    kind: str = "error"  # "config", "dataset", "model", "out_of_memory", "error"


@dataclass
class Finished(Event):
    status: str  # "completed" or "stopped"
    step: int
    lora_path: str
    peak_memory_mb: float = 0.0  # the process's peak: GPU memory allocated on CUDA, else RAM (0: not recorded)


@dataclass
class CaptionProgress(Event):
    """One image is done: captioned (``caption``) or failed (``error`` says why)."""

    done: int
    total: int  # images this job captions (those already captioned and kept are not counted)
    image: str  # file name in the folder
    caption: str  # as written, trigger word included; "" when it failed
    error: str = ""


@dataclass
class CaptionFinished(Event):
    written: list[str]  # image names whose caption was written
    skipped: list[str]  # image names that kept their existing caption
    failed: list[tuple[str, str]]  # (image name, reason)
    stopped: bool  # True when should_stop() ended the job early


_TYPES = {
    RunStarted: "run_started",
    Phase: "phase",
    Progress: "progress",
    ValidationLoss: "validation_loss",
    SampleWritten: "sample",
    CheckpointSaved: "checkpoint",
    LoraVerified: "lora_verified",
    Message: "message",
    RunError: "error",
    Finished: "finished",
    CaptionProgress: "caption_progress",
    CaptionFinished: "caption_finished",
}
_CLASSES = {name: cls for cls, name in _TYPES.items()}

Emit = Callable[[Event], None]


def jsonl_writer(path: str | os.PathLike) -> Emit:
    """An ``emit`` that appends each event as one line of ``path``."""
    from core.fsutil import append_line

    path = Path(path)

    def write(event: Event) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)  # on first use: creating it early would claim the name
        append_line(path, event.to_json())

    return write


def parse(obj: dict[str, Any]) -> Event:
    """The event a JSON object of an events file stands for.

    Raises ValueError for an unknown type or a missing field, so a field
    renamed on the writing side fails loudly instead of reading as 0. Fields
    the class does not have (written by a newer version) are left out.
    """
    cls = _CLASSES.get(obj.get("type"))
    if cls is None:
        raise ValueError(f"unknown event type {obj.get('type')!r}")
    fields = dataclasses.fields(cls)
    missing = [f.name for f in fields if f.name not in obj and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"a {obj['type']} event without {', '.join(missing)}")
    return cls(**{f.name: obj[f.name] for f in fields if f.name in obj})


def read_typed(path: str | os.PathLike, start: int = 0) -> tuple[list[Event], int]:
    """``read_events`` as event objects; an event that cannot be read becomes a warning Message."""
    events, end = read_events(path, start)
    typed = []
    for obj in events:
        try:
            typed.append(parse(obj))
        except (ValueError, TypeError) as exc:
            typed.append(Message("warning", f"skipped an event this version cannot read ({exc})"))
    return typed, end


def read_events(path: str | os.PathLike, start: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Read whole lines of an events file from byte offset ``start``.

    Returns the events and the offset to pass next time, so a poller reads
    only what is new. A last line still being written (no newline yet) is left
    for the next call. A line that is not a whole event (written when the disk
    filled up, or cut by a kill) becomes a warning message in its place.
    """
    try:
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read()
    except FileNotFoundError:
        return [], start
    end = data.rfind(b"\n") + 1
    events = []
    for line in data[:end].splitlines():
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except ValueError:  # a line cut short by a full disk or a kill: skip it, say so, read on
            event = None
        if isinstance(event, dict) and isinstance(event.get("type"), str):
            events.append(event)
        else:
            events.append({"type": "message", "level": "warning", "time": time.time(),
                           "text": f"skipped a damaged line in {Path(path).name} ({len(line)} bytes: "
                                   f"{line[:60].decode('utf-8', 'replace')!r}...)"})
    return events, start + end
