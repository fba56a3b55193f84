"""The run queue: runs that train one after another, each as its own ``python -m core train`` process.

Everything lives next to the runs, in ``OUTPUTS/.queue/``:

* ``queue.json`` -- the entries in the order they will train, with each one's state;
* ``ENTRY.toml`` -- each entry's whole config, frozen when it was added;
* ``trainer.lock`` -- the worker's PID while one works the queue (the trainer-lock format,
  so the app sees whether it is alive);
* ``PAUSE`` -- present when the queue should start nothing new.

A worker (``python -m core queue run``) takes the first waiting entry, trains it,
records how it ended, and goes on, until nothing waits. A failed run does not stop
the queue; a stopped run keeps what it saved and the queue moves on. The app
starts the worker as a detached process, so the queue outlives an app restart; an
entry whose worker died mid-run goes back to waiting and resumes from its last
save. Every change to ``queue.json`` is a locked read-modify-write, written atomically.

A sweep is one base config and, for one or two settings, a list of values each: it
becomes one entry per value (or per pair of values). The runs share the latent and
text caches, which are keyed by content.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import re
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core import config as config_mod
from core.config import ConfigError, TrainConfig

QUEUE_DIR = ".queue"
WAITING, RUNNING = "waiting", "running"
ENDED = ("completed", "stopped", "failed", "cancelled")
MOVES = ("up", "down", "top", "bottom")
# Short names of the settings sweeps vary most, for run names ("photos-lr0.0001-rank8").
_SHORT = {"train.learning_rate": "lr", "train.text_encoder_lr": "telr", "lora.rank": "rank", "lora.alpha": "alpha",
          "train.max_train_steps": "steps", "train.max_train_epochs": "epochs", "train.optimizer": "",
          "train.batch_size": "bs", "train.lr_scheduler": "", "lora.type": "", "train.noise_offset": "noise"}
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Entry:
    """One queued run."""

    id: int
    name: str  # the run's output.name (its folder under the outputs folder)
    config: str  # the frozen config file of this entry
    state: str = WAITING  # waiting, running, completed, stopped, failed or cancelled
    sweep: dict[str, Any] = field(default_factory=dict)  # {"section.key": value} this run tries
    group: str = ""  # the sweep it belongs to ("" for a single run)
    added: float = 0.0
    started: float = 0.0
    ended: float = 0.0
    message: str = ""  # how it ended: the error, or where it stopped

    @property
    def label(self) -> str:
        tried = ", ".join(f"{k} = {v}" for k, v in self.sweep.items())
        return f"#{self.id} {self.name}" + (f" ({tried})" if tried else "")


def parse_sweep(text: str) -> tuple[str, list[Any]]:
    """``section.key=v1,v2,...`` -> ("section.key", [v1, v2, ...]); each value read as TOML, else a word."""
    key, sep, values = text.partition("=")
    key = key.strip()
    section, dot, name = key.partition(".")
    if not sep or not dot or not name:
        raise ConfigError(f"sweep {text!r}: expected section.key=value1,value2,..., e.g. "
                          f"train.learning_rate=1e-4,3e-4")
    parsed = []
    for item in (v.strip() for v in values.split(",")):
        if not item:
            continue
        try:
            parsed.append(tomllib.loads(f"v = {item}")["v"])
        except tomllib.TOMLDecodeError:
            parsed.append(item)
    if not parsed:
        raise ConfigError(f"sweep {key}: give at least one value after '=', separated by commas")
    if len(set(map(repr, parsed))) != len(parsed):
        raise ConfigError(f"sweep {key}: a value is listed twice ({values.strip()})")
    return key, parsed


def sweep_configs(config: TrainConfig, axes: list[tuple[str, list[Any]]]) -> list[tuple[TrainConfig, dict]]:
    """One validated config per combination of the axes' values (at most two axes), named after what it tries."""
    if len(axes) > 2:
        raise ConfigError("a sweep varies one setting, or two as a grid; split a larger one into several sweeps")
    keys = [key for key, _ in axes]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"sweep: {keys[0]} is given twice; list all its values in one sweep")
    combos = list(itertools.product(*[values for _, values in axes]))
    if len(combos) > 64:
        raise ConfigError(f"sweep: {len(combos)} runs is more than 64; use fewer values")
    made = []
    for combo in combos:
        tried = dict(zip(keys, combo, strict=True))
        raw = config_mod.to_raw(config)
        for key, value in tried.items():
            section, name = key.split(".", 1)
            if section not in raw or not isinstance(raw[section], dict):
                raise ConfigError(f"sweep: unknown section in {key}")
            raw[section][name] = value
        if tried:
            raw["output"]["name"] = config.output.name + "".join(f"-{_short(k)}{_word(v)}" for k, v in tried.items())
        try:
            made.append((config_mod.from_dict(raw), tried))
        except ConfigError as exc:
            what = ", ".join(f"{k} = {v!r}" for k, v in tried.items())
            raise ConfigError(f"sweep {what}: {exc}") from None
    return made


def _short(key: str) -> str:
    return _SHORT.get(key, key.rsplit(".", 1)[-1].replace("_", ""))


def _word(value: Any) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value).lower()
    return re.sub(r"[^A-Za-z0-9.+]+", "-", text).strip("-") or "x"


class RunQueue:
    """The queue of one outputs folder (see the module docstring)."""

    def __init__(self, outputs_dir: str | os.PathLike):
        self.outputs = Path(outputs_dir).expanduser().resolve()
        self.folder = self.outputs / QUEUE_DIR
        self.file = self.folder / "queue.json"
        self.pause_file = self.folder / "PAUSE"

    # ------------------------------------------------------------ reading and editing

    def entries(self) -> list[Entry]:
        return [Entry(**e) for e in self._read().get("entries", [])]

    def get(self, entry_id: int) -> Entry:
        for entry in self.entries():
            if entry.id == int(entry_id):
                return entry
        raise ConfigError(f"the queue has no entry #{entry_id}; `python -m core queue list` shows them")

    def _read(self) -> dict:
        import json

        try:
            data = json.loads(self.file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {"next_id": 1, "entries": []}
        except (OSError, ValueError) as exc:
            raise ConfigError(f"the queue file {self.file} cannot be read ({exc}); move it away to start an empty "
                              f"queue") from None
        return data if isinstance(data, dict) else {"next_id": 1, "entries": []}

    @contextlib.contextmanager
    def _edit(self) -> Iterator[dict]:
        """The queue's data, locked against other writers (the app, the worker), written back atomically."""
        from core.fsutil import write_json

        self.folder.mkdir(parents=True, exist_ok=True)
        with _file_lock(self.folder / "queue.json.lock"):
            data = self._read()
            yield data
            write_json(self.file, data)

    def _update(self, entry_id: int, **changes) -> Entry:
        with self._edit() as data:
            for raw in data["entries"]:
                if raw["id"] == entry_id:
                    raw.update(changes)
                    return Entry(**raw)
        raise ConfigError(f"the queue has no entry #{entry_id}")

    def add(self, config: TrainConfig, sweep: list[tuple[str, list[Any]]] | None = None) -> list[Entry]:
        """Queue a run (or one run per value of a sweep); each config is checked now, not when its turn comes."""
        from core.config_checks import preflight
        from core.training.run_folder import name_taken

        made = sweep_configs(config, sweep or [])
        group = time.strftime("sweep-%Y%m%d-%H%M%S") if sweep else ""
        added = []
        with self._edit() as data:
            taken = {e["name"] for e in data["entries"] if e["state"] in (WAITING, RUNNING)}
            for one, tried in made:
                one = config_mod.resolve_paths(one)
                preflight(one)
                name = one.output.name
                number = 1
                while name in taken or name_taken(config_mod.with_values(one, {"output.name": name})):
                    number += 1
                    name = f"{one.output.name}-{number}"
                one = config_mod.with_values(one, {"output.name": name})
                taken.add(name)
                entry_id = data.get("next_id", 1)
                data["next_id"] = entry_id + 1
                path = self.folder / f"{entry_id}-{name}.toml"
                config_mod.save(one, path)
                entry = Entry(entry_id, name, str(path), sweep=tried, group=group, added=time.time())
                data["entries"].append(dataclasses.asdict(entry))
                added.append(entry)
        return added

    def cancel(self, entry_id: int) -> Entry:
        """A waiting entry is cancelled; a running one is asked to stop (it saves, and the queue moves on)."""
        entry = self.get(entry_id)
        if entry.state == WAITING:
            return self._update(entry.id, state="cancelled", ended=time.time(), message="cancelled before it started")
        if entry.state == RUNNING:
            from core.training.run_folder import RunPaths

            run_dir = self.outputs / entry.name
            if run_dir.is_dir():
                RunPaths(run_dir).stop.touch()
            return entry
        raise ConfigError(f"queue entry #{entry.id} ({entry.name}) already ended ({entry.state})")

    def move(self, entry_id: int, where: str) -> None:
        """Move a waiting entry up, down, to the top or to the bottom among the waiting ones."""
        if where not in MOVES:
            raise ConfigError(f"move: where must be one of {', '.join(MOVES)}, not {where!r}")
        with self._edit() as data:
            entries = data["entries"]
            waiting = [i for i, e in enumerate(entries) if e["state"] == WAITING]
            index = next((i for i in waiting if entries[i]["id"] == int(entry_id)), None)
            if index is None:
                raise ConfigError(f"queue entry #{entry_id} is not waiting; only waiting entries can be moved")
            slot = waiting.index(index)
            target = {"up": max(slot - 1, 0), "down": min(slot + 1, len(waiting) - 1), "top": 0,
                      "bottom": len(waiting) - 1}[where]
            order = [entries[i] for i in waiting]
            order.insert(target, order.pop(slot))
            for i, entry in zip(waiting, order, strict=True):
                entries[i] = entry

    def clear(self) -> int:
        """Forget the entries that ended (their runs stay in the outputs folder); returns how many."""
        with self._edit() as data:
            ended = [e for e in data["entries"] if e["state"] in ENDED]
            data["entries"] = [e for e in data["entries"] if e["state"] not in ENDED]
        for entry in ended:
            with contextlib.suppress(OSError):
                Path(entry["config"]).unlink()
        return len(ended)

    # ------------------------------------------------------------ the worker

    def worker(self):
        """The live worker's lock (PID, start), or None when nobody works the queue."""
        from core.training.run_folder import live_lock

        return live_lock(self.folder)

    @property
    def paused(self) -> bool:
        return self.pause_file.exists()

    def pause(self) -> None:
        """Start nothing new: the run in progress finishes, then the worker ends."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.pause_file.touch()

    def start_worker(self, python: str = sys.executable) -> bool:
        """Start ``python -m core queue run`` detached (it outlives the app); False if one works already or
        nothing waits."""
        with contextlib.suppress(FileNotFoundError):
            self.pause_file.unlink()
        if self.worker() is not None or not any(e.state in (WAITING, RUNNING) for e in self.entries()):
            return False
        self.folder.mkdir(parents=True, exist_ok=True)
        detach = ({"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if os.name == "nt"
                  else {"start_new_session": True})
        with open(self.folder / "worker.log", "ab") as log:
            subprocess.Popen([python, "-m", "core", "queue", "run", "--outputs", str(self.outputs)], cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}, stdout=log,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **detach)
        deadline = time.time() + 30
        while self.worker() is None and time.time() < deadline:  # so the app shows it running at once
            time.sleep(0.1)
        return True

    def run(self, say: Callable[[str], None] = print, should_stop: Callable[[], bool] = lambda: False,
            python: str = sys.executable) -> int:
        """Work the queue until nothing waits, it is paused or ``should_stop``; returns how many runs trained."""
        from core.training.run_folder import trainer_lock

        count = 0
        with trainer_lock(self.folder):
            self._recover()
            while not (should_stop() or self.paused):
                self._wait_for_free_gpu(say, should_stop)
                entry = next((e for e in self.entries() if e.state == WAITING), None)
                if entry is None or should_stop() or self.paused:
                    break
                self._train(entry, say, should_stop, python)
                count += 1
        return count

    def _recover(self) -> None:
        """An entry left running by a worker that died goes back to waiting (it resumes from its last save)."""
        with self._edit() as data:
            for raw in data["entries"]:
                if raw["state"] == RUNNING:
                    raw.update(state=WAITING, message="its worker ended mid-run; it continues from its last save")

    def _wait_for_free_gpu(self, say, should_stop) -> None:
        """A run started by hand (or by another app) trains first: one run at a time on the GPU."""
        from core.training.run_folder import list_runs, live_lock

        told = False
        while not should_stop():
            live = [run.name for run in list_runs(self.outputs) if live_lock(run) is not None]
            if not live:
                return
            if not told:
                say(f"waiting for {live[0]} to finish before the next queued run")
                told = True
            time.sleep(2.0)

    def _train(self, entry: Entry, say, should_stop, python: str) -> None:
        from core.training.run_folder import APP_LOG_ENV, run_status

        run_dir = self.outputs / entry.name
        status = run_status(run_dir)
        args = ["train", entry.config]
        if status.resumable_from is not None and status.state in ("interrupted", "stopped", "failed"):
            args.append("--resume")
        self._update(entry.id, state=RUNNING, started=time.time(), message="")
        say(f"training {entry.label}" + (" (resuming)" if "--resume" in args else ""))
        log = self.outputs / ".app" / f"{entry.name}-{time.strftime('%Y%m%d-%H%M%S')}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "wb") as out:
            process = subprocess.Popen([python, "-m", "core", *args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL,
                                       env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1",
                                            APP_LOG_ENV: str(log)})
            asked = False
            while process.poll() is None:
                if should_stop() and not asked:  # the worker is told to stop: the run saves first
                    _ask_to_stop(process, run_dir)
                    asked = True
                time.sleep(0.5)
        ended = run_status(run_dir)
        state = ended.state if ended.state in ENDED else "failed"
        message = ended.error or (f"stopped at step {ended.step}" if state == "stopped" else "")
        if state == "failed" and not message:
            message = _last_line(log) or f"the training process ended with exit code {process.returncode}"
        if should_stop() and state != "completed":
            # Stopped by the worker's own stop: it waits again (and resumes) when the queue next runs.
            self._update(entry.id, state=WAITING, message=f"paused at step {ended.step}; it resumes from there")
        else:
            self._update(entry.id, state=state, ended=time.time(), message=message)
        say(f"{entry.label}: {state}" + (f" ({message})" if message else ""))


def _ask_to_stop(process: subprocess.Popen, run_dir: Path) -> None:
    import signal

    from core.training.run_folder import RunPaths

    if run_dir.is_dir():
        RunPaths(run_dir).stop.touch()
    if os.name == "posix":
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)


def _last_line(log: Path) -> str:
    try:
        lines = [line for line in log.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1].strip()[:500] if lines else ""


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes on ``path`` (held while the block runs)."""
    with open(path, "a+b") as handle:
        if os.name == "nt":
            import msvcrt

            while True:
                try:
                    msvcrt.locking(handle.fileno(), msvcrt.LK_LOCK, 1)
                    break
                except OSError:
                    time.sleep(0.05)
            try:
                yield
            finally:
                handle.seek(0)
                msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
        else:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
