"""The Train tab's live view of a run: status (with the final file), progress, loss plot, samples, errors."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from core.events import LoraVerified
from ui.runner import RunSummary


def progress_html(summary: RunSummary | None, running: bool) -> str:
    if summary is None:
        return "<div class='run-idle'>No run yet.</div>"
    total = max(summary.total_steps, 1)
    state = "running" if running else (summary.finished or ("failed" if summary.error else "ended"))
    if summary.total_steps:
        line = f"step {summary.step}/{summary.total_steps}"
        if running and summary.step < summary.total_steps:  # a time left only while steps are left to run
            eta = f"{int(summary.eta_s // 60)}:{int(summary.eta_s % 60):02d}"
            line += f" · {summary.it_per_s:.2f} it/s · ETA {eta}"
        line += f" · {state}"
    else:  # before the first step: what it is doing (loading the model, caching latents), not "step 0/0"
        line = html.escape(summary.phase or "starting") if running else state
    return (
        f"<div class='run-progress' data-state='{state}' data-step='{summary.step}' "
        f"data-total='{summary.total_steps}'>"
        f"<b>{html.escape(summary.run_dir.name)}</b> — {html.escape(summary.phase or state)}<br>"
        f"<progress max='{total}' value='{summary.step}' style='width:100%'></progress><br>"
        f"{line}{check_html(summary.check)}</div>"
    )


def check_html(check: LoraVerified | None) -> str:
    """The newest LoRA file check: how many modules map onto the base model, the image change, problems."""
    if not check:
        return ""
    name = html.escape(Path(check.path).name)
    change = f" · image change {check.mean_change:.2f}/255" if check.mean_change is not None else ""
    loads = " · diffusers loads it" if check.loads else ""
    verdict = "✓" if check.ok else "✗ " + html.escape("; ".join(check.problems[:3]))
    return (f"<br><span class='lora-check' data-ok='{str(check.ok).lower()}'>check of {name}: "
            f"{check.matched}/{check.modules} modules map onto the base model{loads}{change} {verdict}</span>")


# A colour per curve, set when the plot is made: the plot keeps the legend and colours it starts with, so
# curves whose first points come later (every one, on a page opened before the first run) need them then.
SERIES_COLOURS = {"training": "#2563eb", "validation": "#f97316", "validation (EMA)": "#16a34a"}


def loss_frame(summary: RunSummary | None):
    """The loss plot's points. The columns keep their types even with no point yet: the plot reads its axes'
    kinds from the first frame it gets, and an empty frame of untyped columns made every loss value its own
    label on a page opened before the first run."""
    import pandas as pd

    rows = []
    if summary:
        rows += [{"step": s, "loss": v, "series": "training"} for s, v in summary.losses]
        rows += [{"step": s, "loss": v, "series": "validation"} for s, v in summary.validation]
        rows += [{"step": s, "loss": v, "series": "validation (EMA)"} for s, v in summary.ema_validation]
    # One empty point per curve, first (an empty point breaks a line, so before any real one): the plot takes
    # its curves (legend, colours) from the first frame it gets.
    rows = [{"step": 0, "loss": float("nan"), "series": name} for name in SERIES_COLOURS] + rows
    frame = pd.DataFrame(rows, columns=["step", "loss", "series"])
    return frame.astype({"step": "int64", "loss": "float64", "series": "string"})


# The step axis spans at least this many steps: with fewer, the plot's ticks fall between steps (0.5, 1.5).
MIN_STEP_SPAN = 16


def loss_plot(summary: RunSummary | None):
    """The loss plot's update: its points, and a step axis from 0 to the run's last step (at least
    MIN_STEP_SPAN), so its ticks are whole steps and the curve grows across a fixed axis."""
    import gradio as gr

    total = summary.total_steps if summary else 0
    return gr.update(value=loss_frame(summary), x_lim=[0, max(total, MIN_STEP_SPAN)])


def sample_gallery(summary: RunSummary | None, newest: int = 8) -> list[tuple[str, str]]:
    if not summary:
        return []
    return [(path, f"step {step}{' (EMA)' if path.endswith('-ema.png') else ''}: {prompt}")
            for step, path, prompt in summary.samples[-newest:]][::-1]


def run_files_text(run_dir: Path) -> str:
    """The LoRA files of a run, newest step last, for the Past runs view (never a save in progress)."""
    from core.training.run_folder import RunPaths

    files = RunPaths(run_dir).lora_files()
    if not files:
        return f"Run `{run_dir.name}` has no LoRA file yet."
    lines = [f"- `{p}` ({p.stat().st_size / 1e6:.1f} MB)" for p in files]
    return f"LoRA files of `{run_dir.name}` (use them in the Prompt tab):\n" + "\n".join(lines)


def error_text(summary: RunSummary | None) -> str:
    from ui.wording import in_app_words

    return in_app_words(summary.error) if summary and summary.error else ""


def error_box(text: str = ""):
    """The Error box: shown only while there is an error to read."""
    import gradio as gr

    return gr.update(value=text, visible=bool(text))


def status_text(summary: RunSummary | None, running: bool) -> str:
    """The line above the progress: "Starting…" until the trainer reports, then what is true."""
    if summary is None:
        return ""
    name = f"**{summary.run_dir.name}**"
    if summary.error:
        return f"⚠️ {name} failed: see the error below."
    if summary.finished == "completed":
        return f"{name} completed. {final_file_text(summary)}"
    if summary.finished == "stopped":
        return f"{name} stopped at step {summary.step} and saved; **Resume** under Past runs continues it."
    if not running:
        return f"{name} ended without finishing; **Resume** under Past runs continues from its last save."
    if summary.total_steps:
        return f"Training {name}."
    return f"Starting {name}… {summary.phase or '(loading the engine)'}"


def final_file_text(summary: RunSummary) -> str:
    """Where the LoRA is: its name, size and folder, and its check (the last one, the full one after a run)."""
    path = Path(summary.lora_path)
    if not path.is_file():
        return ""
    size = path.stat().st_size
    text = f"**Your LoRA:** `{path.name}` ({size / 2**20:.1f} MB) in `{path.parent}`"
    check = summary.check
    if check is not None and Path(check.path) == path:
        verdict = "✓ checked" if check.ok else "✗ failed its check: " + "; ".join(check.problems[:2])
        text += f" · {verdict} ({check.matched}/{check.modules} modules map onto the base model)"
    return text


def final_file(summary: RunSummary | None):
    """The Download and Use-in-Prompt-tab buttons: shown, with the file, once a run has its final LoRA."""
    import gradio as gr

    path = Path(summary.lora_path) if summary is not None and summary.lora_path else None
    ready = path is not None and path.is_file() and summary.finished in ("completed", "stopped")
    return (gr.update(value=str(path) if ready else None, visible=ready), gr.update(visible=ready),
            str(path) if ready else "")


def run_view() -> dict[str, Any]:
    """The live view of a run: status (with the final file's buttons), progress, error, loss plot, samples,
    log."""
    import gradio as gr

    view: dict[str, Any] = {"status": gr.Markdown(elem_id="train-status")}
    with gr.Row():
        view["download"] = gr.DownloadButton("Download the LoRA", visible=False, elem_id="train-download",
                                             size="sm")
        view["use_lora"] = gr.Button("Use in Prompt tab", visible=False, elem_id="train-use-lora", size="sm")
    view["final"] = gr.State("")
    view["progress"] = gr.HTML(progress_html(None, False), elem_id="train-progress")
    view["error"] = gr.Textbox(label="Error", visible=False, interactive=False, elem_id="train-error")
    view["plot"] = gr.LinePlot(loss_frame(None), x="step", y="loss", color="series", title="Loss",
                               x_lim=[0, MIN_STEP_SPAN],
                               color_map=SERIES_COLOURS, elem_id="train-loss-plot", height=260)
    view["samples"] = gr.Gallery(label="Newest samples", columns=4, height=260, elem_id="train-samples")
    view["log"] = gr.Textbox(label="Log", lines=8, max_lines=8, interactive=False, elem_id="train-log")
    return view
