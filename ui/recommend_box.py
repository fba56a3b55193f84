"""The Runs tab's "Recommend a checkpoint and strength" box: which LoRA file of the picked runs to use, at what
strength, and why (the rule is in core.training.recommend).

The judging draws many pictures, so it runs as ``python -m core recommend RUNS --events FILE --json`` (the
command a user could type; core/cli_recommend.py) in a background process: a crash or an out-of-memory error
ends that process, never the app. A gr.Timer polls its events while it runs; at the end the box reads
recommendation.json and shows the reasons, the table of cells and the grid picture. Nothing here runs at import.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from core.events import Event, Message, Phase, RunError
from ui.runner import CliJob
from ui.settings import AppSettings, lora_choices, model_choices
from ui.widgets import Refresh

STRENGTHS = "0.5, 0.75, 1"
NO_CLIP = ""  # the CLIP field's "none": leakage is measured in pixels, likeness and adherence not at all
HEADERS = ("checkpoint", "strength", "likeness", "adherence change", "leakage", "acceptable", "recommended")
WINNER = "★ recommended"


# ------------------------------------------------------------ what the box offers


def is_clip_folder(folder: Path) -> bool:
    """A folder whose config.json says it holds a CLIP model (model_type "clip")."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("model_type") == "clip"


def cached_clip_ids() -> list[str]:
    """The known CLIP hub ids already in the local Hugging Face cache (a lookup on disk, never a download)."""
    from huggingface_hub import try_to_load_from_cache

    from core.training.image_scores import KNOWN_CLIP_MODELS

    return [repo for repo in KNOWN_CLIP_MODELS if isinstance(try_to_load_from_cache(repo, "config.json"), str)]


def clip_choices(models_dir: Path) -> list[tuple[str, str]]:
    """(label, value) of the CLIP field: none first, then CLIP folders under models/ (NAME or OWNER/NAME), then
    known hub ids in the cache. Hidden folders are skipped."""
    folders = sorted(p.parent for pattern in ("*/config.json", "*/*/config.json") for p in models_dir.glob(pattern))
    local = [f for f in folders if not any(part.startswith(".") for part in f.relative_to(models_dir).parts)
             and is_clip_folder(f)]
    return ([("none: leakage measured in pixels", NO_CLIP)]
            + [(f"{f.relative_to(models_dir).as_posix()} (CLIP)", str(f)) for f in local]
            + [(f"{repo} (in the cache)", repo) for repo in cached_clip_ids()])


# ------------------------------------------------------------ the job


def parse_form(run_dirs: list[str] | None, strengths_text: str | None) -> tuple[list[str], list[float]]:
    """The picked runs and strengths, checked before a process starts; ValueError says what to do."""
    from core.cli_recommend import parse_strengths
    from core.training.recommend import read_run

    runs = [str(d) for d in run_dirs or [] if d]
    if not runs:
        raise ValueError("pick one or more finished runs under 'Runs to compare' first, then press Recommend")
    text = (strengths_text or "").replace(";", ",").strip().strip(",")
    if not text:
        raise ValueError("enter the strengths to compare, e.g. 0.5, 0.75, 1 (or 'none' to rank the checkpoints "
                         "by validation loss alone)")
    try:
        strengths = parse_strengths(text)
    except ValueError:
        raise ValueError(f"strengths {strengths_text!r}: enter numbers separated by commas, e.g. 0.5, 0.75, 1 "
                         f"(or 'none' to rank the checkpoints by validation loss alone)") from None
    bad = [s for s in strengths if not math.isfinite(s) or s < 0]
    if bad:
        raise ValueError(f"strength {bad[0]:g} must be a number of 0 or more (0.5-1 is usual)")
    for run in runs:
        read_run(run)  # RecommendError (a ValueError): no such run, not finished, no LoRA files
    return runs, strengths


def command_args(runs: list[str], strengths: list[float], clip: str | None, events_path: Path) -> list[str]:
    """The arguments of ``python -m core``: recommend RUNS --strengths ... [--clip MODEL] --events FILE --json."""
    args = ["recommend", *runs, "--strengths", ",".join(str(s) for s in strengths) or "none"]
    if clip and clip.strip():
        args += ["--clip", clip.strip()]
    return args + ["--events", str(events_path), "--json"]


@dataclass
class RecommendStatus:
    """What the progress line shows, folded from the job's events (CliJob feeds them to ``apply``)."""

    phase: str = ""
    done: int = 0
    total: int = 0
    messages: list[str] = field(default_factory=list)
    error: str = ""

    def apply(self, event: Event) -> None:
        match event:
            case Phase():
                self.phase, self.done, self.total = event.name, event.done, event.total
            case Message():
                self.messages.append(event.text)
            case RunError():
                self.error = event.message

    def text(self) -> str:
        if self.phase == "grid" and self.total:
            return f"Recommending: grid {self.done}/{self.total}…"
        if self.phase:
            return f"Recommending: {self.phase}…"
        return "Recommending: starting (reading the runs, loading the models)…"


def job_files(jobs_dir: Path) -> tuple[Path, Path]:
    """A fresh (events file, log) pair in the app's job folder: the events writer appends, so never reuse one."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        name = f"recommend-{stamp}" + (f"-{n}" if n else "")
        events, log = jobs_dir / f"{name}.jsonl", jobs_dir / f"{name}.log"
        if not events.exists() and not log.exists():
            return events, log
    raise RuntimeError(f"too many recommendation jobs this second in {jobs_dir}")


def printed_json(output: str) -> dict | None:
    """The recommendation the command printed with --json: the last JSON object of its output (the log also
    holds the stderr lines: progress, warnings)."""
    decoder = json.JSONDecoder()
    for match in reversed(list(re.finditer(r"^\{$", output, re.MULTILINE))):
        try:
            value, _ = decoder.raw_decode(output, match.start())
        except ValueError:
            continue
        if isinstance(value, dict) and "lora_path" in value:
            return value
    return None


def read_result(log_text: str, runs: list[str], since: float) -> dict | None:
    """recommendation.json of the job: where its printed JSON says, else a new one in a picked run's folder."""
    from core.training.recommend import JSON_NAME

    printed = printed_json(log_text)
    candidates = [Path(printed["json_path"])] if printed and printed.get("json_path") else []
    candidates += [Path(run) / JSON_NAME for run in runs]
    for path in candidates:
        try:
            if path.stat().st_mtime >= since - 1:
                return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
    return printed


# ------------------------------------------------------------ what the box shows


def reasons_markdown(rec: dict) -> str:
    """The recommended file, step and strength, then each reason."""
    several = len(rec.get("runs") or []) > 1
    run = f" of run {Path(rec['run_dir']).name}" if several else ""
    loss = rec.get("validation_loss")
    loss_text = f", validation loss {loss:.4f}" if loss is not None else ""
    lines = [f"**Recommended: `{Path(rec['lora_path']).name}`** (step {rec['step']}{run}{loss_text}) at strength "
             f"**{rec['strength']:g}**", "", f"File: `{rec['lora_path']}`", "", "Why:"]
    lines += [f"- {reason}" for reason in rec.get("reasons") or []]
    if rec.get("json_path"):
        lines += ["", f"Every score: `{rec['json_path']}`"]
    return "\n".join(lines)


def cells_frame(rec: dict):
    """One row per cell (checkpoint × strength) with its scores; the winner marked."""
    import pandas as pd

    from core.training.image_scores import num, pct

    clip = bool(rec.get("clip_model"))
    rows = []
    for i, cell in enumerate(rec.get("cells") or []):
        checkpoint = rec["checkpoints"][cell["checkpoint"]]
        leak = cell.get("leakage") if clip else cell.get("pixel_leakage")
        acceptable = "base" if cell["strength"] == 0 else "yes" if cell.get("acceptable") else "no"
        rows.append([checkpoint.get("label") or f"step {checkpoint['step']}", float(cell["strength"]),
                     num(cell.get("likeness")), pct(cell.get("adherence_change")), num(leak), acceptable,
                     WINNER if i == rec.get("winner") else ""])
    headers = list(HEADERS)
    headers[HEADERS.index("leakage")] = "leakage (CLIP)" if clip else "leakage (pixels)"
    return pd.DataFrame(rows, columns=headers)


def empty_frame():
    import pandas as pd

    return pd.DataFrame([], columns=list(HEADERS))


def run_model(rec: dict) -> str | None:
    """The base model of the recommended file's run, from the run's own config (the one it was trained on)."""
    from core import config as config_mod
    from core.training.run_folder import RunPaths

    try:
        return config_mod.load(RunPaths(Path(rec["run_dir"])).config, check_paths=False).model.path
    except (OSError, ValueError):
        return (rec.get("settings") or {}).get("model")


def chosen_of(rec: dict) -> dict:
    """What "Use in Prompt tab" picks: {"lora": path, "strength": s, "model": the run's base model}."""
    return {"lora": rec["lora_path"], "strength": float(rec["strength"]), "model": run_model(rec)}


# ------------------------------------------------------------ handlers (plain functions; build() wires them)


class RecommendJobs:
    """The recommendation job of this app (one at a time), started and followed by the box's handlers.

    Each handler returns the box's outputs: (progress, timer, reasons, table, grid picture, chosen)."""

    def __init__(self, settings: AppSettings, env: dict[str, str] | None = None, python: str = sys.executable):
        self.settings = settings
        self.env = env  # extra environment of the process (tests: OMP_NUM_THREADS=1)
        self.python = python
        self.job: CliJob | None = None
        self.runs: list[str] = []
        self.stopped = False

    @property
    def running(self) -> bool:
        return self.job is not None and self.job.running

    def start(self, run_dirs: list[str] | None, strengths_text: str | None, clip: str | None):
        import gradio as gr

        if self.running:
            return ("⚠️ a recommendation is already running; wait for it or press Stop", *[gr.skip()] * 5)
        try:
            runs, strengths = parse_form(run_dirs, strengths_text)
        except ValueError as exc:
            return (f"⚠️ {' '.join(str(exc).split())}", *[gr.skip()] * 5)
        events, log = job_files(self.settings.outputs_dir / ".app")
        self.job = CliJob(command_args(runs, strengths, clip, events), events, log, RecommendStatus(),
                          self.python, env=self.env)
        self.runs, self.stopped = runs, False
        return self.job.status.text(), gr.Timer(active=True), "", empty_frame(), None, None

    def tick(self):
        import gradio as gr

        if self.job is None:
            return (gr.skip(), gr.Timer(active=False), *[gr.skip()] * 4)
        status = self.job.poll()
        if self.job.running:
            return (status.text(), *[gr.skip()] * 5)
        status = self.job.poll()  # the events written between the last read and the end
        off = gr.Timer(active=False)
        if self.stopped:
            return ("Stopped: no recommendation this time.", off, *[gr.skip()] * 4)
        if status.error:
            return (f"⚠️ recommending failed: {status.error} (log: {self.job.log_path})", off, *[gr.skip()] * 4)
        try:
            output = self.job.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            output = ""
        rec = read_result(output, self.runs, self.job.started_at)
        if rec is None:
            return (f"⚠️ the recommendation ended without a result; see the log {self.job.log_path}", off,
                    *[gr.skip()] * 4)
        picture = rec.get("image_path") or None
        done = f"Done: {Path(rec['lora_path']).name} at strength {rec['strength']:g}."
        return done, off, reasons_markdown(rec), cells_frame(rec), picture, chosen_of(rec)

    def stop(self) -> str:
        if not self.running:
            return "No recommendation is running."
        self.stopped = True
        self.job.stop()
        return "Stopping…"

    def on_load(self):
        """A reloaded page follows the job again (its timer starts inactive): its progress while it runs, its
        result once it has ended."""
        import gradio as gr

        return gr.Timer(active=True) if self.job is not None else gr.skip()


def use(settings: AppSettings, chosen: dict | None):
    """"Use in Prompt tab": (base model, LoRA, strength) updates for the Prompt tab's fields, and a message."""
    import gradio as gr

    if not chosen:
        return (gr.skip(), gr.skip(), gr.skip(),
                "⚠️ nothing recommended yet: pick runs, press Recommend, and use it once it is done")
    models = gr.update(choices=model_choices(settings.models_dir), value=chosen["model"]) if chosen["model"] \
        else gr.skip()
    return (models, gr.update(choices=lora_choices(settings.outputs_dir), value=chosen["lora"]),
            gr.update(value=chosen["strength"]),
            f"Picked {Path(chosen['lora']).name} at strength {chosen['strength']:g} in the Prompt tab.")


# ------------------------------------------------------------------ layout


INTRO = ("Which LoRA file of the picked runs to use, and at what strength: the checkpoint with the lowest "
         "validation loss, then pictures at each strength (with and without the trigger, against the base "
         "model at the same seeds) judged for likeness and prompt adherence (with a CLIP model) and leakage. "
         "It writes recommendation.json and recommendation.png into the recommended file's run folder.")


def build(settings: AppSettings, runs_component, jobs: RecommendJobs | None = None) -> dict:
    """The box's components and events (called inside the Runs tab); ``runs_component``: the picked runs."""
    import gradio as gr

    jobs = jobs or RecommendJobs(settings)
    with gr.Accordion("Recommend a checkpoint and strength", open=False, elem_id="recommend-box"):
        gr.Markdown(INTRO)
        with gr.Row():
            strengths = gr.Textbox(STRENGTHS, label="Strengths", elem_id="recommend-strengths",
                                   info="comma-separated; 'none': by validation loss alone, no pictures")
            clip = gr.Dropdown(clip_choices(settings.models_dir), value=NO_CLIP, allow_custom_value=True,
                               label="CLIP model (optional)", elem_id="recommend-clip",
                               info="a folder under models/ or a hub id already in the cache; none: leakage is "
                                    "the pixel change, likeness and adherence are not measured")
        with gr.Row():
            start = gr.Button("Recommend", variant="primary", elem_id="recommend-start")
            stop = gr.Button("Stop", elem_id="recommend-stop")
            use_button = gr.Button("Use in Prompt tab", elem_id="recommend-use")
        progress = gr.Markdown(elem_id="recommend-progress")
        reasons = gr.Markdown(elem_id="recommend-reasons")
        table = gr.Dataframe(empty_frame(), interactive=False, wrap=True, label="Checkpoints × strengths",
                             elem_id="recommend-table")
        grid = gr.Image(label="Grid (the recommended cell framed in green)", type="filepath", height=640,
                        interactive=False, elem_id="recommend-grid")
        chosen = gr.State(None)
    timer = gr.Timer(1.0, active=False)

    # Named functions: gradio's API names for the events (scripts and tests call them by these).
    def on_recommend(run_dirs, text, model):
        return jobs.start(run_dirs, text, model)

    def on_recommend_tick():
        return jobs.tick()

    def on_recommend_stop():
        return jobs.stop()

    def on_recommend_load(current):
        choices = clip_choices(settings.models_dir)
        return gr.update(choices=choices, value=current), jobs.on_load()

    def on_recommend_use(picked):
        return use(settings, picked)

    shown = [progress, timer, reasons, table, grid, chosen]
    start.click(on_recommend, [runs_component, strengths, clip], shown)
    timer.tick(on_recommend_tick, None, shown, show_progress="hidden")
    stop.click(on_recommend_stop, None, progress)
    return {"strengths": strengths, "clip": clip, "start": start, "stop": stop, "use": use_button,
            "progress": progress, "reasons": reasons, "table": table, "grid": grid, "chosen": chosen,
            "timer": timer, "jobs": jobs,
            # "Use in Prompt tab": the app wires on_use(chosen) to the Prompt tab's model, LoRA and strength, and
            # this box's progress line: (model, lora, scale, message) updates.
            "on_use": on_recommend_use,
            "on_load": [Refresh(on_recommend_load, [clip], [clip, timer])]}
