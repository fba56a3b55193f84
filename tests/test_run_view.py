"""The Train tab's live view of a run (ui/run_view.py): the events folded into a summary, and what it shows."""

from pathlib import Path

from ui import run_view
from ui.runner import RunSummary


def test_summary_folds_events_and_views_render(tmp_path):
    from core.events import LoraVerified, Phase, Progress, RunError, RunStarted, SampleWritten, ValidationLoss

    s = RunSummary(tmp_path / "run")
    for event in [
        Phase("caching training latents", 2, 5),
        RunStarted(str(tmp_path / "run"), 10, 0, 5, 1, 1, 1, "cpu"),
        ValidationLoss(0, 1.2, True),
        Progress(1, 10, 0, 1.1, 1e-4, 2.0, 4.5),
        SampleWritten(1, "/x/a.png", "p", 0),
        RunError("out of GPU memory: lower train.batch_size", "out_of_memory"),
    ]:
        s.apply(event)
    assert s.step == 1 and s.total_steps == 10 and s.losses == [(1, 1.1)] and s.validation == [(0, 1.2)]
    html = run_view.progress_html(s, running=False)
    assert "data-state='failed'" in html and "step 1/10" in html and "ETA" not in html  # no time left on an end
    frame = run_view.loss_frame(s)
    points = frame.dropna()  # the curves' empty first points (their legend) carry no loss
    assert sorted(points["series"]) == ["training", "validation"]
    # Numbers even with no point yet: the plot reads its axes' kinds from the first frame it gets.
    empty = run_view.loss_frame(None)
    assert str(empty["step"].dtype) == "int64" and str(empty["loss"].dtype) == "float64"
    assert sorted(empty["series"]) == sorted(run_view.SERIES_COLOURS) and empty["loss"].isna().all()
    assert run_view.sample_gallery(s) == [("/x/a.png", "step 1: p")]
    assert run_view.error_text(s).startswith("out of GPU memory")
    # The Error box shows only while there is an error (an empty box read as "something is wrong").
    assert run_view.error_box(run_view.error_text(s))["visible"] is True
    assert run_view.error_box(run_view.error_text(None)) == {"__type__": "update", "value": "", "visible": False}
    s.apply(LoraVerified(-1, "/x/my.safetensors", False, 12, 10, ["not in the base model: lora_unet_x"], 3.5, True))
    html = run_view.progress_html(s, running=False)
    assert "check of my.safetensors: 10/12 modules map onto the base model" in html
    assert "data-ok='false'" in html and "lora_unet_x" in html and "image change 3.50/255" in html


def test_the_status_line_says_starting_until_the_trainer_reports(tmp_path):
    from pathlib import Path

    from core.events import Finished, Phase, RunStarted

    summary = RunSummary(Path(tmp_path / "my-run"))
    assert run_view.status_text(summary, running=True).startswith("Starting **my-run**…")
    summary.apply(Phase("caching training latents", 3, 9))
    assert "caching training latents 3/9" in run_view.status_text(summary, running=True)
    summary.apply(RunStarted(str(tmp_path / "my-run"), 10, 0, 5, 1, 1, 1, "cpu"))
    assert run_view.status_text(summary, running=True) == "Training **my-run**."
    assert "ended without finishing" in run_view.status_text(summary, running=False)
    summary.apply(Finished("stopped", 4, "x.safetensors"))
    assert "stopped at step" in run_view.status_text(summary, running=False)
    summary.error = "dataset: no readable image"
    assert "failed" in run_view.status_text(summary, running=False)


def test_engine_advice_reads_in_the_apps_words():
    """Errors the engine writes for the terminal too ("--resume", "python -m core plan ... --fit") are said with
    the app's buttons in the Train tab."""
    from core.config import TrainConfig
    from core.training.memory_advice import out_of_memory_advice
    from ui.runner import RunSummary
    from ui.wording import in_app_words

    config = TrainConfig()
    advice = out_of_memory_advice(config, 5, Path("o/run-step000005.safetensors"))
    assert "--" in advice and "python -m core" in advice  # the terminal's words
    summary = RunSummary(Path("o/run"))
    summary.error = advice
    shown = run_view.error_text(summary)
    assert "--" not in shown and "python -m core" not in shown and "Fit my GPU" in shown, shown
    assert "Resume (under Past runs) continues" in shown
    assert in_app_words("already holds a run named 'x'; pass --resume to continue it") == \
        "already holds a run named 'x'; resume it under Past runs to continue it"


def test_the_live_view_sends_each_page_only_what_changed():
    """The Train tab's timer: a page gets its first view whole, then only the outputs that changed (the
    plot and the gallery are not redrawn every second), and everything again after it opened another run."""
    from types import SimpleNamespace

    import pandas as pd

    from ui.unchanged import SentBefore

    sent, page, other = SentBefore(), SimpleNamespace(session_hash="a"), SimpleNamespace(session_hash="b")
    plot = pd.DataFrame({"step": [1, 2], "loss": [0.5, 0.4]})
    view = ("<progress 2/6>", plot, [("s.png", "step 2")], "log")
    assert sent.only_changed(page, view) == view
    again = sent.only_changed(page, ("<progress 2/6>", plot.copy(), [("s.png", "step 2")], "log"))
    assert all(isinstance(v, dict) and v.get("__type__") == "update" and len(v) == 1 for v in again), again
    moved = sent.only_changed(page, ("<progress 3/6>", plot, [("s.png", "step 2")], "log"))
    assert moved[0] == "<progress 3/6>" and all(isinstance(v, dict) for v in moved[1:])
    assert sent.only_changed(other, view) == view  # another page gets its own first view
    sent.forget(page)
    assert sent.only_changed(page, view) == view
    assert sent.only_changed(SimpleNamespace(), view) == view  # no session: always everything
