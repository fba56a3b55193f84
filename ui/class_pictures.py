"""The Dataset tab's "Class pictures" box: draw regularisation pictures with a base model, as a background job.

The job is ``python -m core class-pictures`` (core/cli_class.py); its pictures go to a dataset of their own
beside the picked one, ``NAME class``, which the Train tab's ``dataset.regularization_path`` then names.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from core.data import dataset_store as store
from core.events import Event, Phase, RunError
from ui.runner import CliJob
from ui.settings import AppSettings


@dataclass
class ClassStatus:
    done: int = 0
    total: int = 0
    loading: bool = True
    error: str = ""
    folder: str = ""

    def apply(self, event: Event) -> None:
        match event:
            case Phase(name="drawing class pictures"):
                self.done, self.total, self.loading = event.done, event.total, False
            case RunError():
                self.error = event.message

    def text(self, running: bool) -> str:
        if self.error:
            return f"⚠️ drawing class pictures failed: {self.error}"
        if running:
            return ("Loading the model…" if self.loading or not self.total
                    else f"Drawing class pictures {self.done}/{self.total}…")
        return (f"{self.done} class pictures in `{self.folder}`. To train with them, set Regularization path "
                f"(Train tab, Advanced, Data) to that folder.")


class ClassJob(CliJob):
    def __init__(self, model: str, prompt: str, count: int, out: Path, jobs_dir: Path, steps: int = 0,
                 python: str = sys.executable):
        stamp = time.strftime("%Y%m%d-%H%M%S")
        events = jobs_dir / f"class-pictures-{out.name}-{stamp}.jsonl"
        args = ["class-pictures", "--model", model, "--prompt", prompt, "--count", str(count), "--out", str(out),
                "--events", str(events)] + (["--steps", str(steps)] if steps else [])
        super().__init__(args, events, jobs_dir / f"class-pictures-{out.name}-{stamp}.log",
                         ClassStatus(folder=str(out)), python)


class ClassJobs:
    """One class-pictures job at a time, started and followed by the box's handlers."""

    def __init__(self, settings: AppSettings):
        self.settings = settings
        self.job: ClassJob | None = None

    def start(self, name, model, prompt, count, steps=0):
        """-> (message, timer update)."""
        import gradio as gr

        if not name:
            return "⚠️ pick the dataset the class pictures are for first", gr.skip()
        if not (model or "").strip():
            return "⚠️ enter the base model (the one you train on) to draw them with", gr.skip()
        if not (prompt or "").strip():
            return "⚠️ write the class prompt, e.g. 'a photo of a dog'", gr.skip()
        if self.job is not None and self.job.running:
            return "⚠️ class pictures are being drawn already; stop that job or wait", gr.skip()
        try:
            out = store.create_dataset(self.settings.datasets_dir, f"{name} class")
        except store.DatasetStoreError as exc:
            return f"⚠️ {exc}", gr.skip()
        self.job = ClassJob(model.strip(), prompt.strip(), int(count or 1), out, self.settings.outputs_dir / ".app",
                            int(steps or 0))
        return "Loading the model…", gr.Timer(active=True)

    def tick(self):
        import gradio as gr

        if self.job is None:
            return gr.skip(), gr.Timer(active=False)
        status = self.job.poll()
        running = self.job.running
        return status.text(running), gr.skip() if running else gr.Timer(active=False)

    def stop(self) -> str:
        if self.job is None or not self.job.running:
            return "No class-pictures job is running."
        self.job.stop()
        return "Stopping after the current picture… (start it again to continue where it was)"


def build(settings: AppSettings, picker) -> dict:
    """The box's components, wired; ``picker`` is the Dataset tab's dataset dropdown."""
    import gradio as gr

    from ui.dataset_tab import handler

    jobs = ClassJobs(settings)
    with gr.Accordion("Class pictures (regularisation)", open=False, elem_id="dataset-class-box"):
        gr.Markdown("Pictures of the class your subject belongs to, drawn by the base model, keep the LoRA from "
                    "forgetting what the class looks like. They go to a dataset of their own, **NAME class**.")
        with gr.Row():
            model = gr.Textbox(label="Base model", placeholder="the model you train on", elem_id="class-model")
            prompt = gr.Textbox(label="Class prompt", placeholder="a photo of a dog", elem_id="class-prompt")
            count = gr.Number(label="How many", value=50, precision=0, minimum=1, maximum=2000, elem_id="class-count")
            steps = gr.Number(label="Steps", value=0, precision=0, minimum=0, maximum=200, elem_id="class-steps",
                              info="0: the model's own")
        with gr.Row():
            start = gr.Button("Draw class pictures", elem_id="class-start")
            stop = gr.Button("Stop", elem_id="class-stop")
        progress = gr.Markdown(elem_id="class-progress")
    timer = gr.Timer(1.0, active=False)
    start.click(handler(jobs.start, name="on_class_pictures"), [picker, model, prompt, count, steps],
                [progress, timer])
    timer.tick(handler(jobs.tick, name="on_class_tick"), outputs=[progress, timer], show_progress="hidden")
    stop.click(handler(jobs.stop, name="on_stop_class"), outputs=progress)
    return {"model": model, "jobs": jobs}
