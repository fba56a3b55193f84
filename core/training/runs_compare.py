"""Training runs side by side: what differs between them and how each went.

Everything here is read from the run folders (``core.training.run_folder``):
the resolved ``config.toml`` says how a run was set up, ``events.jsonl`` what
happened. ``run_rows`` gives one row per run with only the settings that
differ between the runs compared (the rest would be the same in every
column); ``validation_curves`` the validation losses to overlay;
``side_by_side_samples`` each run's newest sample at a prompt and seed they
all share, so the pictures compare like with like. The app's Runs tab and
``python -m core runs`` show the same rows.
"""

from __future__ import annotations

import os
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from core import config as config_mod
from core.config import ConfigError, TrainConfig
from core.events import Finished, LoraVerified, Progress, SampleWritten, ValidationLoss, read_typed
from core.training.run_folder import CONFIG_FILE, EVENTS_FILE, LOCK_FILE, RunPaths, run_status

# Settings never shown as a difference: the run's name is its own column.
SAME_BY_NATURE = {"output.name"}


# ------------------------------------------------------------ one run's events


@dataclass
class RunEvents:
    """What the comparison needs from a run's events file, folded in one pass."""

    first_time: float | None = None
    last_time: float | None = None
    validation: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) of the live weights
    ema_validation: list[tuple[int, float]] = field(default_factory=list)  # of train.ema's moving average
    speeds: list[float] = field(default_factory=list)  # Progress.it_per_s
    samples: list[SampleWritten] = field(default_factory=list)  # the live weights' (not the moving average's)
    checks: list[LoraVerified] = field(default_factory=list)
    finished: Finished | None = None
    step: int = 0
    total_steps: int = 0


def read_run(run_dir: str | Path) -> RunEvents:
    folded = RunEvents()
    events, _ = read_typed(RunPaths(Path(run_dir)).events)
    for event in events:
        folded.first_time = event.time if folded.first_time is None else folded.first_time
        folded.last_time = event.time
        match event:
            case Progress():
                folded.step, folded.total_steps = event.step, event.total_steps
                if event.it_per_s > 0:
                    folded.speeds.append(event.it_per_s)
            case ValidationLoss(ema=True):
                folded.ema_validation.append((event.step, event.loss))
            case ValidationLoss():
                folded.validation.append((event.step, event.loss))
            case SampleWritten() if not event.path.endswith("-ema.png"):
                folded.samples.append(event)
            case LoraVerified():
                folded.checks.append(event)
            case Finished():
                folded.finished = event
    return folded


def best(points: list[tuple[int, float]]) -> tuple[float | None, int | None]:
    """The lowest loss and its step (the earliest step on a tie); (None, None) without points."""
    if not points:
        return None, None
    step, loss = min(points, key=lambda point: (point[1], point[0]))
    return loss, step


def final_check(events: RunEvents, lora_path: str) -> LoraVerified | None:
    """The check that speaks for the final file: the full one after the run (step -1), else the newest of that
    file, else the newest check of any file."""
    full = [c for c in events.checks if c.step == -1]
    of_file = [c for c in events.checks if lora_path and Path(c.path) == Path(lora_path)]
    found = full or of_file or events.checks
    return found[-1] if found else None


def check_label(check: LoraVerified | None) -> str:
    if check is None:
        return ""
    if check.ok:
        return f"ok {check.matched}/{check.modules}"
    return "failed: " + "; ".join(check.problems[:2] or [f"{check.matched}/{check.modules} modules map"])


# ------------------------------------------------------------ rows


@dataclass
class RunRow:
    """One run in the comparison (None: not known, e.g. a run without validation or an older events file)."""

    name: str
    run_dir: str
    state: str  # run_status: completed, stopped, failed, running, interrupted or new
    family: str
    model: str  # the base model, its path shortened
    settings: dict[str, Any]  # "section.key" -> value, only those that differ between the runs compared
    best_loss: float | None = None  # validation loss of the live weights
    best_step: int | None = None
    best_ema_loss: float | None = None  # of the moving average (train.ema)
    best_ema_step: int | None = None
    wall_time_s: float | None = None  # first to last event
    steps_per_s: float | None = None  # median of the progress reports
    peak_memory_mb: float | None = None
    file_size_bytes: int | None = None
    check: str = ""  # the final file's check: "ok 8/8", "failed: ...", "" when not checked
    check_ok: bool | None = None
    lora_path: str = ""
    step: int = 0
    total_steps: int = 0
    config_error: str = ""  # why config.toml could not be read

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def run_rows(run_dirs: list[str | Path]) -> list[RunRow]:
    """A row per run, in the order given, with the settings that differ between these runs."""
    run_dirs = [Path(d) for d in run_dirs]
    configs, errors = zip(*(read_config(d) for d in run_dirs), strict=True) if run_dirs else ((), ())
    differing = differing_settings(list(configs))
    return [_row(d, c, s, e) for d, c, s, e in zip(run_dirs, configs, differing, errors, strict=True)]


def read_config(run_dir: Path) -> tuple[TrainConfig | None, str]:
    """The run's resolved config, or None and why not (no file, or one this version cannot read)."""
    path = RunPaths(run_dir).config
    if not path.is_file():
        return None, f"no {CONFIG_FILE}"
    try:
        return config_mod.load(path, check_paths=False), ""
    except (ConfigError, OSError, ValueError) as exc:
        return None, f"{CONFIG_FILE}: {exc}"


def _row(run_dir: Path, config: TrainConfig | None, settings: dict[str, Any], config_error: str) -> RunRow:
    events = read_run(run_dir)
    lora = events.finished.lora_path if events.finished and events.finished.lora_path else ""
    if not lora and RunPaths(run_dir).final_lora.is_file():
        lora = str(RunPaths(run_dir).final_lora)
    check = final_check(events, lora)
    status = run_status(run_dir)
    row = RunRow(name=run_dir.name, run_dir=str(run_dir), state=status.state, family=_family(config, lora),
                 model=short_path(config.model.path) if config else "", settings=settings, lora_path=lora,
                 check=check_label(check), check_ok=check.ok if check else None, config_error=config_error,
                 step=status.step or events.step, total_steps=status.total or events.total_steps)
    row.best_loss, row.best_step = best(events.validation)
    row.best_ema_loss, row.best_ema_step = best(events.ema_validation)
    if events.first_time is not None and events.last_time is not None:
        row.wall_time_s = events.last_time - events.first_time
    row.steps_per_s = statistics.median(events.speeds) if events.speeds else None
    peak = events.finished.peak_memory_mb if events.finished else 0.0
    row.peak_memory_mb = peak or None  # 0: a run from before peak memory was recorded
    row.file_size_bytes = Path(lora).stat().st_size if lora and Path(lora).is_file() else None
    return row


def _family(config: TrainConfig | None, lora: str) -> str:
    """The model family: the config's, else the base model folder's, else what the LoRA file says."""
    if config is not None and config.model.family != "auto":
        return config.model.family
    if config is not None and (Path(config.model.path) / "model_index.json").is_file():
        from core.base.families import FamilyError, detect_family

        try:
            return detect_family(config.model.path).name
        except FamilyError:
            pass  # not a family this app trains: the LoRA file may still say
    if lora and Path(lora).is_file():
        from core.lora.lora_info import read_lora_info
        from core.lora.lora_io import LoraFileError

        try:
            return read_lora_info(lora)["metadata"].get("ss_base_model_version", "")
        except (LoraFileError, OSError):
            return ""
    return config.model.family if config is not None else ""


def differing_settings(configs: list[TrainConfig | None]) -> list[dict[str, Any]]:
    """For each config, ``{"section.key": value}`` of the settings whose values are not the same in all of
    them (runs without a config are left out of the comparison and get {}). Paths are shortened to the
    fewest trailing parts that still tell them apart."""
    from core.training.tracking import hyperparameters

    flats = [hyperparameters(c) if c is not None else None for c in configs]
    known = [f for f in flats if f is not None]
    if len(known) < 2:
        return [{} for _ in configs]
    keys = [k for k in known[0] if k not in SAME_BY_NATURE and len({repr(f.get(k)) for f in known}) > 1]
    shown = {k: dict(zip([repr(f.get(k)) for f in known], shorten_paths([f.get(k) for f in known]), strict=True))
             for k in keys}
    return [{k: shown[k][repr(f.get(k))] for k in keys} if f is not None else {} for f in flats]


def short_path(value: str) -> str:
    """A local path's last part (a hub id or any other text stays as it is)."""
    return shorten_paths([value])[0]


def shorten_paths(values: list[Any]) -> list[Any]:
    """Absolute paths cut to their last parts, as few as still tell the different ones apart; anything
    else as it is."""
    paths = {v for v in values if isinstance(v, str) and os.path.isabs(v)}
    if not paths:
        return list(values)
    longest = max(len(Path(p).parts) for p in paths)
    for keep in range(1, longest + 1):
        tails = {p: str(Path(*Path(p).parts[-keep:])) for p in paths}
        if len(set(tails.values())) == len(paths):
            break
    return [tails.get(v, v) if isinstance(v, str) else v for v in values]


# ------------------------------------------------------------ curves and samples


class CurvePoint(NamedTuple):
    run: str  # the run's name; "NAME (EMA)" for its moving average's curve
    step: int
    loss: float


def validation_curves(run_dirs: list[str | Path], ema: bool = True) -> list[CurvePoint]:
    """Every run's validation losses, to overlay in one plot (a curve per run, and per moving average)."""
    points = []
    for run_dir in map(Path, run_dirs):
        events = read_run(run_dir)
        points += [CurvePoint(run_dir.name, step, loss) for step, loss in events.validation]
        if ema:
            points += [CurvePoint(f"{run_dir.name} (EMA)", step, loss) for step, loss in events.ema_validation]
    return points


@dataclass
class SampleCell:
    run: str
    step: int
    path: str
    prompt: str
    seed: int

    @property
    def caption(self) -> str:
        return f"{self.run} · step {self.step}"


@dataclass
class SampleComparison:
    pairs: list[tuple[str, int]]  # the (prompt, seed) pairs every run has a sample of, in the first run's order
    cells: list[SampleCell]  # for each pair shown, each run's newest sample at it, in the runs' order
    note: str = ""  # why nothing (or not everything) is shown; "" when all is well


def side_by_side_samples(run_dirs: list[str | Path], prompt: str | None = None,
                         seed: int | None = None) -> SampleComparison:
    """Each run's newest sample image for the prompt and seed pairs all the runs share (only those: a
    picture at another prompt or seed says nothing about the settings). ``prompt`` and ``seed`` pick
    pairs among them."""
    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        return SampleComparison([], [], "Pick runs to compare.")
    newest = [_newest_samples(d) for d in run_dirs]
    empty = [d.name for d, found in zip(run_dirs, newest, strict=True) if not found]
    if empty:
        return SampleComparison([], [], f"No sample images in {', '.join(empty)} (sample.prompts was empty, or "
                                        f"the run stopped before its first sample).")
    common = [pair for pair in newest[0] if all(pair in found for found in newest[1:])]
    if not common:
        seen = "; ".join(f"{d.name}: " + ", ".join(f"{p!r} seed {s}" for p, s in found)
                         for d, found in zip(run_dirs, newest, strict=True))
        return SampleComparison([], [], f"These runs share no sample prompt and seed, so their samples do not "
                                        f"compare like with like ({seen}).")
    shown = [(p, s) for p, s in common if (prompt is None or p == prompt) and (seed is None or s == seed)]
    note = "" if shown else f"No common sample at {_pair_text(prompt, seed)}; the common ones: " + ", ".join(
        f"{p!r} seed {s}" for p, s in common)
    cells = [found[pair] for pair in shown for found in newest]
    return SampleComparison(common, cells, note)


def _pair_text(prompt: str | None, seed: int | None) -> str:
    return " and ".join(part for part in (f"prompt {prompt!r}" if prompt is not None else "",
                                          f"seed {seed}" if seed is not None else "") if part)


def _newest_samples(run_dir: Path) -> dict[tuple[str, int], SampleCell]:
    """(prompt, seed) -> the run's newest sample there whose file is still on disk, in first-seen order."""
    found: dict[tuple[str, int], SampleCell] = {}
    for sample in read_run(run_dir).samples:
        if not Path(sample.path).is_file():
            continue
        key = (sample.prompt, sample.seed)
        if key not in found or sample.step >= found[key].step:
            found[key] = SampleCell(run_dir.name, sample.step, sample.path, sample.prompt, sample.seed)
    return found


# ------------------------------------------------------------ finding runs and showing rows


def is_run_dir(path: Path) -> bool:
    return any((path / mark).exists() for mark in (EVENTS_FILE, CONFIG_FILE, LOCK_FILE))


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Run folders from paths that are run folders or outputs folders (whose runs come newest first);
    each run once. Raises FileNotFoundError for a path that is not there."""
    from core.training.run_folder import list_runs

    found: list[Path] = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is not a folder: give an outputs folder or run folders")
        for run in [path] if is_run_dir(path) else list_runs(path):
            if run.resolve() not in {f.resolve() for f in found}:
                found.append(run)
    return found


def table(rows: list[RunRow]) -> tuple[list[str], list[list[str]]]:
    """The rows as text cells under headers: the fixed columns, then one per differing setting."""
    ema = any(r.best_ema_loss is not None for r in rows)
    keys = list(dict.fromkeys(k for r in rows for k in r.settings))
    headers = ["run", "state", "model", "best val loss", *(["best EMA val loss"] * ema), "time", "steps/s",
               "peak memory", "file size", "check", *keys]
    cells = []
    for r in rows:
        cells.append([r.name, r.state, f"{r.model} ({r.family})" if r.family else r.model,
                      loss_text(r.best_loss, r.best_step),
                      *([loss_text(r.best_ema_loss, r.best_ema_step)] * ema), duration_text(r.wall_time_s),
                      f"{r.steps_per_s:.2f}" if r.steps_per_s is not None else "", memory_text(r.peak_memory_mb),
                      size_text(r.file_size_bytes), r.check,
                      *(value_text(r.settings.get(k, "")) for k in keys)])
    return headers, cells


def loss_text(loss: float | None, step: int | None) -> str:
    return f"{loss:.4f} @ {step}" if loss is not None else ""


def duration_text(seconds: float | None) -> str:
    if seconds is None:
        return ""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def memory_text(mib: float | None) -> str:
    if mib is None:
        return ""
    return f"{mib / 1024:.1f} GB" if mib >= 1024 else f"{mib:.1f} MB" if mib < 10 else f"{mib:.0f} MB"


def size_text(size: int | None) -> str:
    if size is None:
        return ""
    return f"{size / 1024:.0f} KB" if size < 2**20 else memory_text(size / 2**20)


def value_text(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def format_table(headers: list[str], cells: list[list[str]]) -> str:
    """Columns padded to their widest cell, two spaces apart."""
    widths = [max(len(text) for text in column) for column in zip(headers, *cells, strict=True)]
    lines = [headers, ["-" * w for w in widths], *cells]
    return "\n".join("  ".join(text.ljust(w) for text, w in zip(line, widths, strict=True)).rstrip()
                     for line in lines)
