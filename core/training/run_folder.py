"""The run folder: refusing to mix runs, LoRA files, resume state, who is training it and how it ended.

While a process trains a run, the folder holds ``trainer.lock`` with that
process's PID (and its start time, so a recycled PID is not mistaken for it).
The app finds live runs by it after a restart, and refuses a second trainer on
the same folder. What a run's state *is* comes from what is true on disk:
running (a live trainer), completed or stopped (its last event), failed (an
error event), or interrupted (no process, no ending) and resumable from the
newest saved state.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from core import config as config_mod
from core.config import ConfigError, TrainConfig
from core.fsutil import TEMP_MARK, fsync_path, fsync_tree

STOP_FILE = "STOP"
LOCK_FILE = "trainer.lock"
EVENTS_FILE = "events.jsonl"
CONFIG_FILE = "config.toml"
APP_LOG_ENV = "LORA_STUDIO_LOG"  # set by the app: where the trainer's output goes (recorded in the lock)
LORA_SUFFIX = ".safetensors"


@dataclass(frozen=True)
class RunPaths:
    """The names of everything in a run folder: the protocol between the trainer and whoever reads it.

    The folder is ``output.dir / output.name``; the LoRA files are named after the run.
    """

    dir: Path

    @classmethod
    def of(cls, config: TrainConfig) -> RunPaths:
        return cls(Path(config.run_dir))

    @property
    def name(self) -> str:
        return self.dir.name

    @property
    def events(self) -> Path:  # one JSON object per line (core.events)
        return self.dir / EVENTS_FILE

    @property
    def config(self) -> Path:  # the resolved config, written before step 0
        return self.dir / CONFIG_FILE

    @property
    def stop(self) -> Path:  # created by whoever wants the run to stop after its current step
        return self.dir / STOP_FILE

    @property
    def lock(self) -> Path:  # while a process trains the run: its PID (see TrainerLock)
        return self.dir / LOCK_FILE

    @property
    def traceback(self) -> Path:
        return self.dir / "traceback.txt"

    @property
    def buckets(self) -> Path:
        return self.dir / "buckets.json"

    @property
    def samples(self) -> Path:
        return self.dir / "samples"

    @property
    def states(self) -> Path:
        return self.dir / "state"

    @property
    def final_lora(self) -> Path:
        return self.dir / f"{self.name}{LORA_SUFFIX}"

    def step_lora(self, step: int) -> Path:
        return self.dir / f"{self.name}-step{step:06d}{LORA_SUFFIX}"

    def ema_lora(self, lora: Path) -> Path:
        """The moving average's file beside a LoRA file (train.ema): NAME-ema[-stepN].safetensors."""
        return lora.with_name(lora.name.replace(self.name, f"{self.name}-ema", 1))

    @property
    def diffusers_lora(self) -> Path:
        return self.dir / f"{self.name}-diffusers" / f"pytorch_lora_weights{LORA_SUFFIX}"

    def sample(self, step: int, index: int, kind: str = "") -> Path:
        """A sample image; ``kind`` "ema" for the moving average's (train.ema)."""
        return self.samples / f"step{step:06d}-{index:02d}{'-' + kind if kind else ''}.png"

    def state(self, step: int) -> Path:
        return self.states / f"step-{step:08d}"

    def step_loras(self) -> list[Path]:
        """The intermediate LoRA files, oldest first."""
        return sorted(self.dir.glob(f"{self.name}-step[0-9]*{LORA_SUFFIX}"))

    def lora_files(self) -> list[Path]:
        """The run's LoRA files, final and intermediate, sorted (never a hidden save in progress)."""
        return sorted(p for p in self.dir.glob(f"*{LORA_SUFFIX}") if not p.name.startswith("."))


def save_lora(config: TrainConfig, accelerator, unet, text_encoder, path: Path, step: int, data_info: dict,
              base=None) -> Path:
    """The kohya LoRA file of the run so far (``base``: the core.base.models.BaseModel, for its family)."""
    from core.lora.lora_io import save_kohya_lora
    from core.training.lora_metadata import lora_metadata

    dtype = save_dtype(config)
    te = accelerator.unwrap_model(text_encoder) if config.lora.train_text_encoder else None
    family = base.family.name if base is not None else "sd1"
    prediction = base.prediction_type if base is not None else "epsilon"
    variant = base.variant if base is not None else ""
    return save_kohya_lora(path, accelerator.unwrap_model(unet), te,
                           metadata=lora_metadata(config, step, data_info, family, prediction, variant), dtype=dtype,
                           family=family)


def save_dtype(config: TrainConfig) -> torch.dtype:
    from core.precision import torch_dtype

    return torch_dtype(config.output.save_precision)


def prune_step_loras(paths: RunPaths, keep: int, validation_losses: dict[int, float]) -> list[Path]:
    """Delete intermediate LoRA files beyond the newest ``keep``, never the one saved at the step with the best
    validation loss; returns what was deleted. Called only after a new file is complete."""
    files = paths.step_loras()
    if not keep or len(files) <= keep:
        return []
    steps = {int(p.stem.rsplit("-step", 1)[1]): p for p in files}
    judged = {step: loss for step, loss in validation_losses.items() if step in steps}
    best = steps[min(judged, key=judged.get)] if judged else None
    removed = []
    for path in files[:-keep]:
        if path != best:
            path.unlink(missing_ok=True)
            removed.append(path)
            ema = paths.ema_lora(path)  # its moving average's file goes with it
            if ema.exists():
                ema.unlink()
                removed.append(ema)
    return removed


def latest_state(run_dir: Path) -> Path | None:
    root = RunPaths(run_dir).states
    states = sorted(root.glob("step-*")) if root.is_dir() else []
    return states[-1] if states else None


def save_state(config: TrainConfig, accelerator, step: int) -> Path:
    """Save accelerate's state (LoRA weights, optimizer, scheduler, RNG, progress); keep the newest few."""
    paths = RunPaths.of(config)
    state_root, final = paths.states, paths.state(step)
    tmp = final.with_name(f".tmp-{final.name}")
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        fsync_tree(tmp)  # on the disk before it becomes the state a resume trusts
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)  # a folder cannot be os.replace'd over; a crash leaves only the .tmp one
        fsync_path(state_root)
        for old in sorted(state_root.glob("step-*"))[:-config.output.keep_states]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def register_lora_state_hooks(accelerator, unet, text_encoder) -> None:
    """Make accelerate's save/load_state store only the LoRA weights, not whole gigabyte models."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    names = {id(accelerator.unwrap_model(unet)): "unet"}
    if text_encoder is not None:
        names[id(accelerator.unwrap_model(text_encoder))] = "text_encoder"

    def save_hook(models, weights, output_dir):
        for model in models:
            name = names[id(accelerator.unwrap_model(model))]
            if accelerator.is_main_process:
                tensors = {k: v.detach().cpu().contiguous()
                           for k, v in get_peft_model_state_dict(accelerator.unwrap_model(model)).items()}
                save_file(tensors, str(Path(output_dir) / f"lora_{name}.safetensors"))
            if weights:
                weights.pop()

    def load_hook(models, input_dir):
        while models:
            model = accelerator.unwrap_model(models.pop())
            tensors = load_file(str(Path(input_dir) / f"lora_{names[id(model)]}.safetensors"))
            set_peft_model_state_dict(model, tensors)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def check_run_dir(config: TrainConfig, resume: bool) -> None:
    """Refuse to mix a new run into an old one unless asked (read-only; safe on every process).

    A folder left by a run that never trained a step (it failed while
    loading, say) holds nothing worth keeping and is reused without asking.
    """
    run_dir, paths = config.run_dir, RunPaths.of(config)
    refuse_if_live(run_dir)
    if resume:
        if not latest_state(run_dir):
            raise ConfigError(f"--resume: no saved state in {paths.states}; the run never reached a "
                              f"checkpoint (output.save_every_n_steps) or output.save_state was false")
        _check_resumable(config, paths.config)
        return
    if not _contents(run_dir):
        return
    if not (paths.events.exists() or paths.config.exists()):
        raise ConfigError(f"output folder {run_dir} already exists and was not made by this app; choose "
                          f"another output.name or output.dir")
    if not config.output.overwrite and has_progress(run_dir):
        raise ConfigError(f"output folder {run_dir} already holds a run named {config.output.name!r}; pass "
                          f"--resume to continue it, pick another output.name, or set output.overwrite = true "
                          f"to replace it")


def name_taken(config: TrainConfig) -> bool:
    """Whether starting ``config`` afresh would be refused because its name is an earlier run's (or a folder
    this app did not make): the rule of ``check_run_dir``, without raising."""
    run_dir, paths = config.run_dir, RunPaths.of(config)
    if not _contents(run_dir):
        return False
    if not (paths.events.exists() or paths.config.exists()):
        return True
    return not config.output.overwrite and has_progress(run_dir)


def free_name(config: TrainConfig) -> str:
    """The first of NAME-2, NAME-3, ... that no run (nor other folder) has taken in the output folder."""
    import dataclasses

    from core import config as config_mod

    for number in range(2, 10_000):
        name = f"{config.output.name}-{number}"
        candidate = config_mod.resolve_paths(dataclasses.replace(
            config, output=dataclasses.replace(config.output, name=name)))
        if not candidate.run_dir.exists():
            return name
    raise ConfigError(f"every name from {config.output.name}-2 to -9999 is taken in {config.output.dir}")


def _contents(run_dir: Path) -> list[Path]:
    """What a run folder holds, apart from the lock of the process that is about to use it."""
    if not run_dir.is_dir():
        return []
    return [p for p in run_dir.iterdir() if p.name != LOCK_FILE]


def has_progress(run_dir: Path) -> bool:
    """True once a run has something to lose: a trained step, a LoRA file or a resume state."""
    from core.events import Progress, read_typed

    if latest_state(run_dir) or RunPaths(run_dir).lora_files():
        return True
    events, _ = read_typed(RunPaths(run_dir).events)
    return any(isinstance(e, Progress) for e in events)


# Settings that shape the saved weights and optimizer state: a resumed run must keep them.
_RESUME_FIXED = [("lora", "rank"), ("lora", "target_modules"), ("lora", "train_text_encoder"),
                 ("lora", "text_encoder_target_modules"), ("train", "optimizer"), ("model", "path")]


def _check_resumable(config: TrainConfig, saved_path: Path) -> None:
    if not saved_path.is_file():
        return
    saved = config_mod.load(saved_path, check_paths=False)
    for section, key in _RESUME_FIXED:
        old, new = getattr(getattr(saved, section), key), getattr(getattr(config, section), key)
        if old != new:
            raise ConfigError(f"--resume: {section}.{key} was {old!r} in this run and is {new!r} now; it cannot "
                              f"change in a resumed run (start a new run with another output.name)")


def prepare_run_dir(config: TrainConfig, resume: bool) -> Path:
    """Create (or empty, for a new run over an old one) the run folder; call on the main process only."""
    run_dir = config.run_dir
    if not resume:
        for path in _contents(run_dir):  # check_run_dir made sure it is one of our runs and may go
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    RunPaths(run_dir).stop.unlink(missing_ok=True)
    remove_temporary_files(run_dir)
    return run_dir


def remove_temporary_files(run_dir: Path) -> list[Path]:
    """Delete what saves cut short left behind (``.NAME.xxxx.tmp.safetensors``, ``state/.tmp-step-*``).

    Call only while no process is writing into the run folder. Returns what was removed.
    """
    paths = RunPaths(run_dir)
    removed = []
    for folder in (run_dir, paths.samples, paths.diffusers_lora.parent):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if path.name.startswith(".") and TEMP_MARK in path.name and path.is_file():
                with contextlib.suppress(OSError):
                    path.unlink()
                    removed.append(path)
    if paths.states.is_dir():
        for path in paths.states.glob(".tmp-step-*"):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


# ------------------------------------------------------------ who trains it


@dataclass
class TrainerLock:
    """The content of ``trainer.lock``: which process trains the run, since when, where its output goes."""

    pid: int
    created: float  # the process's start time (psutil), so a recycled PID does not count as this trainer
    started: float
    log: str = ""  # the app's log file of this run's output, if the app started it

    def alive(self) -> bool:
        import psutil

        try:
            process = psutil.Process(self.pid)
            return abs(process.create_time() - self.created) < 1.0 and process.status() != psutil.STATUS_ZOMBIE
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return False


def read_lock(run_dir: Path) -> TrainerLock | None:
    try:
        data = json.loads(RunPaths(run_dir).lock.read_text(encoding="utf-8"))
        return TrainerLock(int(data["pid"]), float(data["created"]), float(data["started"]), str(data.get("log", "")))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no lock, or a damaged one: nobody provably trains the run


def live_lock(run_dir: Path) -> TrainerLock | None:
    """The lock of the process training this run right now, if any."""
    lock = read_lock(run_dir)
    return lock if lock is not None and lock.alive() else None


def refuse_if_live(run_dir: Path) -> None:
    """ConfigError when another process trains the run. In a multi-GPU launch only the main process asks:
    the others belong to the trainer its lock names."""
    if os.environ.get("RANK", "0") != "0":
        return
    lock = live_lock(run_dir)
    if lock is not None and lock.pid != os.getpid():
        raise ConfigError(f"run folder {run_dir} is being trained right now by process {lock.pid} (started "
                          f"{time.strftime('%H:%M', time.localtime(lock.started))}); stop it first (Stop in the "
                          f"app, or Ctrl+C where it runs) or pick another output.name")


@contextlib.contextmanager
def trainer_lock(run_dir: Path):
    """Mark ``run_dir`` as trained by this process for the duration of the block.

    Re-entrant within one process (the command line holds it across the run
    and the final check; ``train.run`` takes it again). On leaving, the lock
    goes and so do temporary files of saves that were cut short. Only the
    main process of a multi-GPU launch takes it.
    """
    import psutil

    if os.environ.get("RANK", "0") != "0" or (read_lock(run_dir) or TrainerLock(-1, 0, 0)).pid == os.getpid():
        yield
        return
    refuse_if_live(run_dir)
    from core.fsutil import write_json

    lock = TrainerLock(os.getpid(), psutil.Process().create_time(), time.time(), os.environ.get(APP_LOG_ENV, ""))
    write_json(RunPaths(run_dir).lock, lock.__dict__)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if (read_lock(run_dir) or lock).pid == os.getpid():
                RunPaths(run_dir).lock.unlink()
        remove_temporary_files(run_dir)


# ------------------------------------------------------------ how it stands


@dataclass
class RunStatus:
    """A run as it truly stands (see the module docstring)."""

    state: str  # "running", "completed", "stopped", "failed", "interrupted" or "new" (nothing happened yet)
    step: int  # the newest trained step
    total: int  # the run's planned steps (0 if it never started training)
    resumable_from: int | None  # the step of the newest resume state
    error: str = ""
    pid: int | None = None
    log: str = ""

    @property
    def resumable(self) -> bool:
        return self.state != "running" and self.resumable_from is not None

    def label(self) -> str:
        if self.state == "running":
            return f"training, step {self.step}/{self.total}" if self.total else "starting"
        if self.state == "completed":
            return f"completed, {self.step} steps"
        where = f" at step {self.step}" if self.step else ""
        resume = f", resumable from step {self.resumable_from}" if self.resumable_from is not None else ""
        return {"stopped": f"stopped{where}{resume}", "failed": f"failed{where}{resume}",
                "interrupted": f"interrupted{where}{resume}", "new": "never trained"}[self.state]


def run_status(run_dir: Path) -> RunStatus:
    from core.events import Finished, Progress, RunError, RunStarted, read_typed

    events, _ = read_typed(RunPaths(run_dir).events)
    step = total = 0
    ending, error = "", ""
    for event in events:
        match event:
            case RunStarted():
                total, step, ending, error = event.total_steps, event.start_step, "", ""
            case Progress():
                step, total = event.step, event.total_steps
            case Finished():
                ending = event.status
            case RunError():
                ending, error = "failed", event.message
    state = latest_state(run_dir)
    resumable = int(state.name.removeprefix("step-")) if state is not None else None
    lock = live_lock(run_dir)
    if lock is not None:
        return RunStatus("running", step, total, resumable, pid=lock.pid, log=lock.log)
    if not ending:
        ending = "interrupted" if (step or total or resumable is not None) else "new"
    return RunStatus(ending, step, total, resumable, error)


def list_runs(outputs_dir: str | Path) -> list[Path]:
    """Run folders (newest first) under the outputs folder: those with an events file, a config or a trainer."""
    root = Path(outputs_dir)
    marks = (EVENTS_FILE, CONFIG_FILE, LOCK_FILE)
    runs = {p.parent for mark in marks for p in root.glob(f"*/{mark}") if not p.parent.name.startswith(".")}

    def newest(run: Path) -> float:
        files = [run / mark for mark in marks]
        return max((f.stat().st_mtime for f in files if f.exists()), default=0.0)

    return sorted(runs, key=newest, reverse=True)
