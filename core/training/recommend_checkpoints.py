"""Step 1 of a recommendation (``core.training.recommend``): reading finished runs, and ranking their LoRA
files by deterministic validation loss, with the reason in words."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class RecommendError(ValueError):
    """Input that cannot be judged (no such run, not finished, no LoRA files); the message says what to do."""


@dataclass
class Checkpoint:
    """A LoRA file of a run and its validation loss (None: not validated)."""

    run: str  # the run folder
    step: int
    path: str
    validation_loss: float | None
    ema: bool = False  # the moving average's file (NAME-ema...), ranked by the EMA's loss
    final: bool = False  # the run's final file (NAME.safetensors)
    label: str = ""


# ------------------------------------------------------------ reading runs


@dataclass
class FinishedRun:
    dir: Path
    config: Any  # TrainConfig
    final_step: int
    live: dict[int, float]
    ema: dict[int, float]

    @property
    def name(self) -> str:
        return self.dir.name

    def file(self, step: int, ema: bool = False) -> Path | None:
        """The LoRA file saved at ``step`` (the final one at the last step), if it is on disk."""
        from core.training.run_folder import RunPaths

        paths = RunPaths(self.dir)
        names = ([paths.final_lora] if step == self.final_step else []) + [paths.step_lora(step)]
        for path in (paths.ema_lora(p) for p in names) if ema else names:
            if path.is_file():
                return path
        return None

    def newest_file(self, ema: bool = False) -> tuple[int, Path] | None:
        """The final file, else the newest intermediate one."""
        from core.training.run_folder import RunPaths

        steps = [int(p.stem.rsplit("-step", 1)[1]) for p in RunPaths(self.dir).step_loras()]
        for step in [self.final_step] + sorted(steps, reverse=True):
            path = self.file(step, ema)
            if path is not None:
                return step, path
        return None


def read_run(run_dir: str | Path) -> FinishedRun:
    """A finished run's config, validation losses and final step; RecommendError when it cannot be judged."""
    from core import config as config_mod
    from core.config import ConfigError
    from core.events import Finished, ValidationLoss, read_typed
    from core.training.run_folder import RunPaths, run_status

    run_dir = Path(run_dir)
    paths = RunPaths(run_dir)
    if not run_dir.is_dir():
        raise RecommendError(f"no run folder {run_dir}: pass the folder of a finished run (OUTPUT_DIR/NAME)")
    if not (paths.config.is_file() and paths.events.is_file()):
        raise RecommendError(f"{run_dir} is not a run folder of this app (it lacks {paths.config.name} or "
                             f"{paths.events.name}); pass the folder of a finished run (OUTPUT_DIR/NAME)")
    status = run_status(run_dir)
    if status.state not in ("completed", "stopped"):
        raise RecommendError(f"run {run_dir.name} has not finished ({status.label()}); recommend a checkpoint "
                             f"once it has completed or been stopped")
    try:
        config = config_mod.load(paths.config, check_paths=False)
    except ConfigError as exc:
        raise RecommendError(f"{paths.config} cannot be read: {exc}") from None
    events, _ = read_typed(paths.events)
    live: dict[int, float] = {}
    ema: dict[int, float] = {}
    final_step = 0
    for event in events:
        if isinstance(event, ValidationLoss) and math.isfinite(event.loss):
            (ema if event.ema else live)[event.step] = event.loss  # a resumed run's repeat replaces it
        elif isinstance(event, Finished):
            final_step = event.step
    run = FinishedRun(run_dir, config, final_step, live, ema)
    if run.newest_file() is None and run.newest_file(ema=True) is None:
        raise RecommendError(f"run {run_dir.name} has no LoRA files in {run_dir} (deleted or moved?); there is "
                             f"nothing to recommend")
    return run


# ------------------------------------------------------------ step 1: the checkpoint by validation loss


def checkpoint_of(run: FinishedRun, step: int, path: Path, loss: float | None, ema: bool, several: bool) -> Checkpoint:
    final = path.name.removesuffix(".safetensors") in (run.name, f"{run.name}-ema")
    label = f"{run.name} " if several else ""
    label += f"step {step}" + (" final" if final else "") + (" EMA" if ema else "")
    return Checkpoint(str(run.dir), step, str(path), loss, ema, final, label)


def rank_checkpoints(runs: list[FinishedRun]) -> tuple[list[Checkpoint], list[Checkpoint], list[str], str]:
    """(ranked: validated checkpoints with a file, lowest loss first; fallbacks: each unvalidated run's final
    file; reasons; which losses ranked them)."""
    several = len(runs) > 1
    ranked, fallbacks, missing, reasons, kinds = [], [], [], [], set()
    for run in runs:
        use_ema = not run.live and bool(run.ema)
        losses = run.ema if use_ema else run.live
        judged = 0
        for step, loss in sorted(losses.items()):
            path = run.file(step, use_ema)
            if path is not None:
                ranked.append(checkpoint_of(run, step, path, loss, use_ema, several))
                judged += 1
            elif step > 0:  # step 0 is the base model: there is never a file
                missing.append((loss, step, run))
        if judged:
            kinds.add("ema" if use_ema else "live")
            continue
        step, path = run.newest_file() or run.newest_file(ema=True)
        fallbacks.append(checkpoint_of(run, step, path, None, "-ema" in path.name, several))
        why = "it has no validation loss (dataset.validation_split is 0 or the dataset too small)" if not losses \
            else "none of its validated steps has a LoRA file left"
        reasons.append(f"run {run.name}: {why}, so its {'final' if step == run.final_step else 'newest'} file "
                       f"{path.name} (step {step}) stands for it")
    ranked.sort(key=lambda c: (c.validation_loss, c.step))
    kind = "none" if not kinds else kinds.pop() if len(kinds) == 1 else "mixed"
    if ranked:
        reasons.insert(0, _validation_reason(ranked, runs, kind, missing))
    return ranked, fallbacks, reasons, kind


def _validation_reason(ranked: list[Checkpoint], runs: list[FinishedRun], kind: str, missing: list) -> str:
    best = ranked[0]
    where = f"step {best.step}" + (f" of run {Path(best.run).name}" if len(runs) > 1 else "")
    which = {"live": "the live weights' loss; the EMA's is not used while the live one exists",
             "ema": "the EMA weights' loss: the only validation loss this run has, so its EMA files are the "
                    "candidates",
             "mixed": "live losses, and the EMA's for runs that have no other"}[kind]
    text = (f"lowest validation loss {best.validation_loss:.4f} at {where} (of {len(ranked)} checkpoints with a "
            f"LoRA file; {which})")
    lower = sorted((m for m in missing if m[0] < best.validation_loss), key=lambda m: m[0])
    if lower:
        loss, step, run = lower[0]
        keep = run.config.output.keep_last_n
        why = f"pruned by output.keep_last_n = {keep}, or deleted" if keep else "deleted, or never saved there"
        more = f" (and {len(lower) - 1} more such steps)" if len(lower) > 1 else ""
        text += (f"; step {step} had a lower loss ({loss:.4f}) but has no LoRA file on disk ({why}){more}, so "
                 f"the best step with a file is recommended")
    base = [run.live.get(0, run.ema.get(0)) for run in runs if 0 in run.live or 0 in run.ema]
    if base and min(base) <= best.validation_loss:
        text += (f"; the base model (step 0) scored {min(base):.4f}, no worse than every checkpoint: training has "
                 f"not improved on the held-out pictures")
    return text


def comparability_note(runs: list[FinishedRun]) -> str | None:
    """A reason when the runs' validation losses were measured differently (a sweep over data or seed)."""
    keys = {"dataset.path": lambda c: c.dataset.path, "dataset.validation_path": lambda c: c.dataset.validation_path,
            "dataset.validation_split": lambda c: c.dataset.validation_split, "train.seed": lambda c: c.train.seed,
            "dataset.resolution": lambda c: c.dataset.resolution,
            "sample.validation_timesteps": lambda c: c.sample.validation_timesteps}
    differ = [name for name, get in keys.items() if len({str(get(r.config)) for r in runs}) > 1]
    if not differ:
        return None
    return (f"the runs measure validation loss differently ({', '.join(differ)} differ), so ranking their "
            f"checkpoints together is only a rough guide")
