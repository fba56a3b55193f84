"""Running training as a subprocess of the project's own CLI, and following it.

The app never trains in its own process: it saves the config, starts
``python -m core train CONFIG`` (the command a user could type) and reads the
run's ``events.jsonl`` as it grows. A crash or out-of-memory error ends that
process, never the app. Nothing here imports gradio, so it is tested directly.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from core import config as config_mod
from core.config import ConfigError, TrainConfig
from core.events import (
    CaptionFinished,
    CaptionProgress,
    CheckpointSaved,
    Event,
    Finished,
    LoraVerified,
    Message,
    Phase,
    Progress,
    RunError,
    RunStarted,
    SampleWritten,
    ValidationLoss,
    read_typed,
)
from core.training.run_folder import (
    APP_LOG_ENV,
    RunPaths,
    TrainerLock,
    list_runs,
    live_lock,
    remove_temporary_files,
    run_status,
)

ROOT = Path(__file__).resolve().parents[1]


class RunBusyError(RuntimeError):
    """A run is already active; the message names it."""


@dataclass
class RunSummary:
    """What the Train tab shows, folded from a run's events."""

    run_dir: Path
    phase: str = ""
    step: int = 0
    total_steps: int = 0
    it_per_s: float = 0.0
    eta_s: float = 0.0
    losses: list[tuple[int, float]] = field(default_factory=list)
    validation: list[tuple[int, float]] = field(default_factory=list)
    ema_validation: list[tuple[int, float]] = field(default_factory=list)  # train.ema's average
    samples: list[tuple[int, str, str]] = field(default_factory=list)  # (step, path, prompt)
    checkpoints: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    error: str = ""
    finished: str = ""  # "completed" / "stopped" once done
    lora_path: str = ""
    check: LoraVerified | None = None  # the newest check of a LoRA file (the final file's full check, once done)

    def apply(self, event: Event) -> None:
        match event:
            case Phase():
                total = f" {event.done}/{event.total}" if event.total else ""
                self.phase = f"{event.name}{total}"
            case RunStarted():
                self.total_steps, self.step, self.phase = event.total_steps, event.start_step, "training"
            case Progress():
                self.step, self.total_steps = event.step, event.total_steps
                self.it_per_s, self.eta_s = event.it_per_s, event.eta_s
                self.losses.append((event.step, event.loss))
            case ValidationLoss(ema=True):
                self.ema_validation.append((event.step, event.loss))
            case ValidationLoss():
                self.validation.append((event.step, event.loss))
            case SampleWritten():
                self.samples.append((event.step, event.path, event.prompt))
            case CheckpointSaved(kind="lora"):
                self.checkpoints.append(event.path)
            case LoraVerified():
                self.check = event
            case Message():
                self.messages.append(f"{event.level}: {event.text}")
            case RunError():
                self.error = event.message
            case Finished():
                self.finished, self.lora_path, self.phase = event.status, event.lora_path, event.status


def summarize(run_dir: str | Path) -> RunSummary:
    """A finished or running run's summary from its whole events file."""
    summary = RunSummary(Path(run_dir))
    events, _ = read_typed(RunPaths(Path(run_dir)).events)
    for event in events:
        summary.apply(event)
    return summary


class CliJob:
    """``python -m core ARGS`` as a background subprocess whose events file is read as it grows.

    ``status`` is any object with ``apply(event)`` and an ``error`` string; it is fed
    the new events on every ``poll``. A process that dies without an error event
    (killed, crashed hard) gets its last output line as the error.
    """

    def __init__(self, args: list[str], events_path: Path, log_path: Path, status, python: str = sys.executable,
                 env: dict[str, str] | None = None):
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.events_path = events_path
        self.log_path = log_path
        self.status = status
        self.offset = 0
        self.started_at = time.time()
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                [python, "-m", "core", *args],
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **(env or {})},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def poll(self):
        events, self.offset = read_typed(self.events_path, self.offset)
        for event in events:
            self.status.apply(event)
        code = self.process.poll()
        if code not in (None, 0) and not self.status.error:
            self.status.error = self.last_output_line() or f"the process ended with exit code {code}"
        return self.status

    def stop(self) -> None:
        """Ask the job to stop after its current step or batch (SIGTERM; Windows can only terminate)."""
        if self.running:
            if os.name == "posix":
                self.process.send_signal(signal.SIGTERM)
            else:
                self.process.terminate()

    def last_output_line(self) -> str:
        lines = [ln for ln in self._log().splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("error:")]
        return (errors or lines or [""])[-1]

    def log_tail(self, lines: int = 20) -> str:
        # The progress bar redraws with carriage returns; keep the last state of each line.
        rows = [row.split("\r")[-1] for row in self._log().split("\n")]
        return "\n".join([row for row in rows if row.strip()][-lines:])

    def _log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


class ActiveRun(CliJob):
    """One training subprocess (``python -m core train ...``) and its folded events."""

    def __init__(self, run_dir: Path, args: list[str], log_path: Path, python: str = sys.executable):
        self.run_dir = run_dir
        # The trainer records where its output goes in its lock, so an app restarted later finds the log.
        super().__init__(args, RunPaths(run_dir).events, log_path, RunSummary(run_dir), python,
                         env={APP_LOG_ENV: str(log_path)})

    @property
    def summary(self) -> RunSummary:
        return self.status

    def stop(self) -> None:
        if os.name == "posix":
            super().stop()
        # Elsewhere terminating would kill the run without saving; the STOP file (RunManager.stop) asks it.


class AttachedRun(ActiveRun):
    """A trainer this app did not start: it outlived an app restart, or was started from the command line.

    It is followed through its lock (alive or not) and its events; Stop reaches it
    through the STOP file and a signal to its PID.
    """

    def __init__(self, run_dir: Path, lock: TrainerLock):
        self.run_dir = run_dir
        self.lock = lock
        self.events_path = RunPaths(run_dir).events
        self.log_path = Path(lock.log) if lock.log else run_dir / "no-log"
        self.status = RunSummary(run_dir)
        self.offset = 0
        self.started_at = lock.started
        self.process = None

    @property
    def running(self) -> bool:
        return self.lock.alive()

    def poll(self):
        events, self.offset = read_typed(self.events_path, self.offset)
        for event in events:
            self.status.apply(event)
        if not self.running and not (self.status.finished or self.status.error):
            found = run_status(self.run_dir)
            if found.state in ("completed", "stopped"):
                self.status.finished = found.state
            else:
                resume = (f"; Resume continues from step {found.resumable_from}" if found.resumable_from is not None
                          else "")
                self.status.error = f"the training process {self.lock.pid} ended without finishing{resume}"
        return self.status

    def stop(self) -> None:
        if os.name == "posix" and self.running:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self.lock.pid, signal.SIGTERM)

    def log_tail(self, lines: int = 20) -> str:
        if not self.lock.log:
            return "(started outside the app: its output is in the terminal that started it)"
        return super().log_tail(lines)

    def wait(self, timeout: float | None = None) -> int | None:
        deadline = None if timeout is None else time.time() + timeout
        while self.running:
            if deadline is not None and time.time() > deadline:
                raise subprocess.TimeoutExpired(f"pid {self.lock.pid}", timeout)
            time.sleep(0.2)
        return None


class RunManager:
    """Starts, resumes and stops training subprocesses, one at a time.

    The active run survives page reloads (it lives here) and app restarts: on
    start the manager looks for a live trainer under the outputs folder and
    follows it again. Temporary files that killed saves left in other runs are
    removed then too.
    """

    def __init__(self, outputs_dir: str | Path, python: str = sys.executable):
        self.outputs_dir = Path(outputs_dir)
        self.python = python
        self.active: ActiveRun | None = None
        for run_dir in list_runs(self.outputs_dir):
            lock = live_lock(run_dir)
            if lock is not None and self.active is None:
                self.active = AttachedRun(run_dir, lock)
            elif lock is None:
                remove_temporary_files(run_dir)

    def busy(self) -> str | None:
        """Why no run can start now (one is training), or None."""
        if self.active and self.active.running:
            return f"a run is already training ({self.active.run_dir.name})"
        for run_dir in list_runs(self.outputs_dir):
            lock = live_lock(run_dir)
            if lock is not None:
                self.active = AttachedRun(run_dir, lock)  # follow it: Stop can reach it from here
                return f"a run is already training ({run_dir.name}, process {lock.pid})"
        return None

    def follow_live(self) -> ActiveRun | None:
        """The run to show: the active one while it trains; once it ended, a run another process started since
        (the queue's next run, or one started from the command line), else the ended one."""
        if self.active is None or not self.active.running:
            for run_dir in list_runs(self.outputs_dir):
                lock = live_lock(run_dir)
                if lock is not None:
                    if self.active is not None:
                        self.active.poll()  # the ended run's last events are folded before it is left
                    self.active = AttachedRun(run_dir, lock)
                    break
        return self.active

    def start(self, config: TrainConfig) -> ActiveRun:
        reason = self.busy()
        if reason:
            raise RunBusyError(f"{reason}; stop it or wait for it to finish before starting another")
        config = config_mod.resolve_paths(config)  # validated by the form (and again by the training process)
        config_path, log_path = self._job_files(config.output.name)
        config_mod.save(config, config_path)
        self.active = ActiveRun(config.run_dir, ["train", str(config_path)], log_path, self.python)
        return self.active

    def resume(self, run_dir: str | Path, total_steps: int = 0) -> ActiveRun:
        """Continue a stopped, interrupted or failed run from its newest saved state (``--resume``).

        ``total_steps`` (0: the run's own total) trains it up to that step instead, so a finished
        run can go further.
        """
        run_dir = Path(run_dir)
        reason = self.busy()
        if reason:
            raise RunBusyError(f"{reason}; stop it or wait for it to finish before resuming another")
        status = run_status(run_dir)
        if status.resumable_from is None:
            raise ConfigError(f"run {run_dir.name} has no saved state to resume from (it never reached a save, "
                              f"or output.save_state was off); start it again instead")
        config = RunPaths(run_dir).config
        if not config.is_file():
            raise ConfigError(f"run {run_dir.name} has no {config.name}; start it again instead")
        total_steps = int(total_steps or 0)
        if total_steps and total_steps <= status.resumable_from:
            raise ConfigError(f"run {run_dir.name} is saved at step {status.resumable_from}; to train it up to a "
                              f"step, enter one after that (or 0 for its own total of {status.total})")
        if status.state == "completed" and not total_steps:
            raise ConfigError(f"run {run_dir.name} already completed its {status.total} steps; enter a larger "
                              f"total under 'Train up to step' to train it further")
        args = ["train", str(config), "--resume"]
        if total_steps:
            args += ["--set", "train.max_train_epochs=0", "--set", f"train.max_train_steps={total_steps}"]
        _, log_path = self._job_files(run_dir.name)
        self.active = ActiveRun(run_dir, args, log_path, self.python)
        return self.active

    def _job_files(self, name: str) -> tuple[Path, Path]:
        jobs = self.outputs_dir / ".app"
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return jobs / f"{name}-{stamp}.toml", jobs / f"{name}-{stamp}.log"

    def stop(self) -> bool:
        """Ask the active run to stop after its current step and save; False if none is running."""
        if not (self.active and self.active.running):
            return False
        if self.active.run_dir.is_dir():
            RunPaths(self.active.run_dir).stop.touch()  # honoured on every platform
        self.active.stop()  # SIGTERM also covers the time before the run folder exists
        return True

    def wait(self, timeout: float | None = None) -> int | None:
        if self.active is None:
            return None
        if self.active.process is None:
            return self.active.wait(timeout)
        return self.active.process.wait(timeout)


@dataclass
class CaptionStatus:
    done: int = 0
    total: int = 0
    last: str = ""  # "image: caption" of the newest one
    finished: bool = False
    stopped: bool = False
    written: int = 0
    skipped: int = 0
    failed: list[str] = field(default_factory=list)
    error: str = ""

    def apply(self, event: Event) -> None:
        match event:
            case CaptionProgress():
                self.done, self.total = event.done, event.total
                self.last = f"{event.image}: {event.caption}"
            case CaptionFinished():
                self.finished, self.stopped = True, event.stopped
                self.written, self.skipped = len(event.written), len(event.skipped)
                self.failed = [f"{name} ({reason})" for name, reason in event.failed]
            case RunError():
                self.error = event.message

    def text(self) -> str:
        if self.error:
            from ui.wording import in_app_words

            return f"⚠️ captioning failed: {in_app_words(self.error)}"
        if self.finished:
            failed = f"; could not read: {', '.join(self.failed)}" if self.failed else ""
            return (f"Captioning {'stopped' if self.stopped else 'done'}: wrote {self.written}, kept "
                    f"{self.skipped} existing caption(s){failed}.")
        if self.total:
            return f"Captioning {self.done}/{self.total} … {self.last}"
        return "Loading the captioner…"


class CaptionJob(CliJob):
    """``python -m core caption`` as a background job whose progress the Dataset tab polls.

    ``options`` are the captioner's own (``{"threshold": 0.5}`` for wd14, ``{"task": "caption"}``
    for florence2), passed as ``--threshold 0.5``; True is a bare flag, False and None are left out.
    """

    def __init__(self, folder: Path, model: str, jobs_dir: Path, captioner: str = "blip", prefix: str = "",
                 overwrite: bool = False, options: dict | None = None, python: str = sys.executable):
        stamp = time.strftime("%Y%m%d-%H%M%S")
        events_path = jobs_dir / f"caption-{folder.name}-{stamp}.jsonl"
        args = ["caption", str(folder), "--captioner", captioner, "--model", model, "--events", str(events_path)]
        if prefix.strip():
            args += ["--prefix", prefix.strip()]
        if overwrite:
            args.append("--overwrite")
        args += option_args(options or {})
        super().__init__(args, events_path, jobs_dir / f"caption-{folder.name}-{stamp}.log", CaptionStatus(), python)


def option_args(options: dict) -> list[str]:
    """Captioner options as command-line arguments.

    ``{"character_threshold": 0.9, "include_rating": True}`` -> ``["--character-threshold", "0.9", "--include-rating"]``
    """
    args = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is not None and value is not False:
            args += [flag, str(value)]
    return args
