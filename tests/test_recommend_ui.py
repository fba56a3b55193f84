"""The Runs tab's Recommend box (ui/recommend_box.py): its handlers run ``python -m core recommend`` as a
background process and show the result.

One tiny run is trained (validation and saves every 2 steps, no sample prompts: the trigger's prompt is judged)
and copied as a second run; their validation losses are then set so the expected pick is known exactly.
"""

import json
import shutil
import time

import pytest
from PIL import Image

from core.events import Message, Phase, RunError, jsonl_writer
from tests.conftest import tiny_config, write_dataset
from ui import recommend_box
from ui.settings import AppSettings

LOSSES = {"rec-a": {2: 0.6, 4: 0.5, 6: 0.55}, "rec-b": {2: 0.7, 4: 0.4, 6: 0.45}}  # best: rec-b step 4
BEST = "rec-b-step000004.safetensors"
STRENGTHS = "0.5, 1"
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # the job must not crowd a busy 2-core machine


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny model runs many small ops: on a busy 2-core machine, torch's thread pool makes them far slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def set_losses(run_dir, losses):
    path = run_dir / "events.jsonl"
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for e in events:
        if e["type"] == "validation_loss" and not e["ema"] and e["step"] in losses:
            e["loss"] = losses[e["step"]]
    path.write_text("".join(json.dumps(e) + "\n" for e in events))


def copy_run(run_dir, target):
    """A copy of the run under another name, its LoRA files renamed to match."""
    shutil.copytree(run_dir, target, ignore=shutil.ignore_patterns("state", "samples", "recommendation.*"))
    for path in target.glob(f"{run_dir.name}*.safetensors"):
        path.rename(target / path.name.replace(run_dir.name, target.name, 1))
    return target


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_model):
    """App settings whose outputs hold two finished runs, rec-a and rec-b."""
    from core.training import train

    settings = AppSettings(tmp_path_factory.mktemp("recommend-ui"))
    settings.ensure()
    data = write_dataset(settings.datasets_dir / "pictures", n=6)
    cfg = tiny_config(tiny_model, data, settings.outputs_dir, name="rec-a",
                      **{"sample.prompts": [], "sample.every_n_steps": 2, "output.save_every_n_steps": 2,
                         "train.learning_rate": 1e-2, "output.trigger_phrase": "sks"})
    assert train.run(cfg, jsonl_writer(cfg.run_dir / "events.jsonl")).status == "completed"
    runs = {"rec-a": cfg.run_dir, "rec-b": copy_run(cfg.run_dir, settings.outputs_dir / "rec-b")}
    for name, run_dir in runs.items():
        set_losses(run_dir, LOSSES[name])
    return settings, runs, tiny_model


def timer_state(update):
    """True/False: the handler turns the timer on/off (a gr.Timer); None: it leaves it as it is (gr.skip())."""
    return getattr(update, "active", None)


def tick_until_done(jobs, deadline_s=240):
    """Tick as the timer would until the job ends: the last outputs, and every progress line seen."""
    seen, deadline = [], time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        out = jobs.tick()
        seen.append(out[0])
        if timer_state(out[1]) is False:
            return out, seen
        time.sleep(0.3)
    jobs.stop()
    pytest.fail(f"the recommendation did not end in {deadline_s} s; progress: {seen[-3:]}")


@pytest.fixture(scope="module")
def finished(app):
    settings, runs, _ = app
    jobs = recommend_box.RecommendJobs(settings, env=ONE_THREAD)
    started = jobs.start([str(runs["rec-a"]), str(runs["rec-b"])], STRENGTHS, "")
    assert started[0].startswith("Recommending") and timer_state(started[1]) is True
    out, seen = tick_until_done(jobs)
    return jobs, out, seen


def test_the_recommendation_names_the_lowest_validation_loss_file(finished, app):
    _, runs, _ = app
    jobs, (progress, _, reasons, table, grid, chosen), seen = finished
    assert progress.startswith("Done") and BEST in progress, (progress, jobs.job.log_path.read_text()[-2000:])
    assert f"**Recommended: `{BEST}`**" in reasons and "step 4 of run rec-b" in reasons
    assert "lowest validation loss 0.4000 at step 4 of run rec-b" in reasons  # the engine's first reason
    assert chosen["lora"] == str(runs["rec-b"] / BEST) and chosen["strength"] in (0.5, 1.0)
    assert "leakage (pixels)" in table.columns  # no CLIP model: pixel leakage
    status = jobs.job.status  # the progress line was folded from the job's events
    assert (status.phase, status.done, status.total) == ("grid", 6, 6) and not status.error


def test_the_table_has_one_row_per_cell_and_marks_the_winner(finished, app):
    _, runs, _ = app
    _, (_, _, _, table, _, chosen), _ = finished
    saved = json.loads((runs["rec-b"] / "recommendation.json").read_text())
    assert len(table) == len(saved["cells"]) == len(saved["checkpoints"]) * 2 == 6  # rec-b 4, rec-b 6, rec-a 4
    winners = table[table["recommended"] == recommend_box.WINNER]
    assert len(winners) == 1
    assert winners.iloc[0]["checkpoint"] == "rec-b step 4" and winners.iloc[0]["strength"] == chosen["strength"]
    assert sorted(set(table["strength"])) == [0.5, 1.0]
    assert set(table["acceptable"]) <= {"yes", "no"}


def test_the_grid_picture_is_shown_large(finished, app):
    _, runs, _ = app
    _, (_, _, _, _, grid, _), _ = finished
    assert grid == str(runs["rec-b"] / "recommendation.png")
    with Image.open(grid) as picture:
        assert max(picture.size) >= 512 and picture.width >= 230 + 2 * 256  # labels + a 256 px cell per strength


def test_use_in_prompt_tab_picks_the_file_strength_and_model(finished, app):
    settings, runs, tiny_model = app
    _, (*_, chosen), _ = finished
    assert chosen["model"] == str(tiny_model)
    model, lora, scale, message = recommend_box.use(settings, chosen)
    assert lora["value"] == str(runs["rec-b"] / BEST) and scale["value"] == chosen["strength"]
    assert model["value"] == str(tiny_model) and BEST in message
    assert str(runs["rec-b"] / BEST) in [value for _, value in lora["choices"]]
    *skipped, message = recommend_box.use(settings, None)
    assert message.startswith("⚠️ nothing recommended yet")


def test_errors_show_as_one_line_and_start_nothing(app, tmp_path):
    settings, runs, _ = app
    jobs = recommend_box.RecommendJobs(settings, env=ONE_THREAD)
    unfinished = copy_run(runs["rec-a"], tmp_path / "rec-u")
    events = unfinished / "events.jsonl"
    events.write_text("".join(line + "\n" for line in events.read_text().splitlines() if '"finished"' not in line))
    cases = [([], STRENGTHS, "pick one or more finished runs"),
             (None, STRENGTHS, "pick one or more finished runs"),
             ([str(runs["rec-a"])], "0.5, x", "enter numbers separated by commas"),
             ([str(runs["rec-a"])], "", "enter the strengths"),
             ([str(runs["rec-a"])], "0.5, -1", "0 or more"),
             ([str(unfinished)], STRENGTHS, "has not finished"),
             ([str(tmp_path / "gone")], STRENGTHS, "no run folder")]
    for run_dirs, text, expected in cases:
        message, timer, *rest = jobs.start(run_dirs, text, "")
        assert message.startswith("⚠️ ") and expected in message and "\n" not in message, (run_dirs, text, message)
        assert timer_state(timer) is None  # the timer stays off
    assert jobs.job is None


def test_stop_ends_the_job_and_says_so(app):
    settings, runs, _ = app
    jobs = recommend_box.RecommendJobs(settings, env=ONE_THREAD)
    jobs.start([str(runs["rec-a"])], STRENGTHS, "")
    assert jobs.start([str(runs["rec-a"])], STRENGTHS, "")[0].startswith("⚠️ a recommendation is already running")
    assert jobs.stop() == "Stopping…"
    (progress, *_), _ = tick_until_done(jobs, 60)
    assert progress.startswith("Stopped") and not jobs.running
    assert jobs.stop() == "No recommendation is running."


def test_the_status_line_follows_the_events():
    status = recommend_box.RecommendStatus()
    assert "starting" in status.text()
    status.apply(Phase("base pictures", 0, 1))
    assert status.text() == "Recommending: base pictures…"
    status.apply(Phase("grid", 3, 12))
    assert status.text() == "Recommending: grid 3/12…"
    status.apply(Message("info", "recommended x at strength 1"))
    status.apply(RunError("CLIP model 'nope' is not available"))
    assert status.messages == ["recommended x at strength 1"] and status.error.startswith("CLIP model")


def test_the_clip_field_lists_clip_folders_and_passes_the_pick(tmp_path):
    from core.training.image_scores import write_tiny_clip

    models = tmp_path / "models"
    write_tiny_clip(models / "owner" / "tiny-clip")
    (models / "unet-ish").mkdir(parents=True)
    (models / "unet-ish" / "config.json").write_text('{"model_type": "unet"}')
    (models / "broken").mkdir()
    (models / "broken" / "config.json").write_text("{not json")
    choices = recommend_box.clip_choices(models)
    assert choices[0][1] == recommend_box.NO_CLIP
    assert [value for _, value in choices[1:] if not value.startswith("openai/")] == [
        str(models / "owner" / "tiny-clip")]
    args = recommend_box.command_args(["r1", "r2"], [0.5, 1.0], str(models / "owner" / "tiny-clip"), tmp_path / "e")
    assert args == ["recommend", "r1", "r2", "--strengths", "0.5,1.0", "--clip", str(models / "owner" / "tiny-clip"),
                    "--events", str(tmp_path / "e"), "--json"]
    assert "--clip" not in recommend_box.command_args(["r1"], [], " ", tmp_path / "e")
    assert recommend_box.command_args(["r1"], [], "", tmp_path / "e")[3] == "none"


def test_the_printed_json_is_found_among_progress_lines():
    rec = {"lora_path": "/x/a.safetensors", "json_path": "/x/recommendation.json", "strength": 0.5}
    output = "base pictures 1/1\ngrid 1/2\nwarning: {odd}\n" + json.dumps(rec, indent=2) + "\n"
    assert recommend_box.printed_json(output) == rec
    assert recommend_box.printed_json("error: no run folder x\n") is None


def test_the_box_builds_with_its_ids(app):
    import gradio as gr

    settings, _, _ = app
    with gr.Blocks():
        runs = gr.Dropdown([], multiselect=True)
        box = recommend_box.build(settings, runs)
    for key, elem_id in (("start", "recommend-start"), ("use", "recommend-use"), ("progress", "recommend-progress"),
                         ("reasons", "recommend-reasons"), ("table", "recommend-table"), ("grid", "recommend-grid")):
        assert box[key].elem_id == elem_id
    assert box["grid"].height >= 512 and box["strengths"].value == "0.5, 0.75, 1"
    assert isinstance(box["chosen"], gr.State) and callable(box["on_use"])
