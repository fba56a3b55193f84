"""Runs side by side (core.training.runs_compare, python -m core runs, the Runs tab): hand-written run folders for
the comparison itself, one real tiny run for what the trainer records (peak memory)."""

import argparse
import json
from pathlib import Path

import pytest

from core import config as config_mod
from core.events import (
    Finished,
    LoraVerified,
    Phase,
    Progress,
    RunError,
    RunStarted,
    SampleWritten,
    ValidationLoss,
)
from core.training import runs_compare
from tests.conftest import EventLog, tiny_config, write_dataset

PROMPT = "a photo of sks"


def write_run(outputs: Path, name: str, settings: dict, events: list, lora_bytes: int = 0,
              samples: tuple = ()) -> Path:
    """A run folder as the trainer leaves it: config.toml (``settings`` as {"section.key": value} over a
    common base), events.jsonl, a LoRA file of ``lora_bytes`` and sample pictures ((step, prompt, seed), ...)."""
    from PIL import Image

    run = outputs / name
    raw = {"model": {"path": str(outputs.parent / "models" / "base"), "family": "sd1"},
           "dataset": {"path": str(outputs.parent / "data" / "pictures"), "resolution": 64},
           "output": {"dir": str(outputs), "name": name}}
    for key, value in settings.items():
        section, field = key.split(".")
        raw.setdefault(section, {})[field] = value
    run.mkdir(parents=True)
    config_mod.save(config_mod.from_dict(raw, check_paths=False), run / "config.toml")
    lora = run / f"{name}.safetensors"
    if lora_bytes:
        lora.write_bytes(b"\0" * lora_bytes)
    for i, (step, prompt, seed) in enumerate(samples):
        path = run / "samples" / f"step{step:06d}-{i:02d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(path)
        events.append(SampleWritten(step, str(path), prompt, seed, time=events[-1].time))
    lines = [e.to_json() for e in sorted(events, key=lambda e: e.time)]
    (run / "events.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return run


def run_events(lora: str, val: list, speeds: list, start: float = 100.0, ema: list = (), peak: float = 0.0,
               ending=None) -> list:
    """A run's events: started at ``start``, a progress report per speed, validation losses ((step, loss), ...)."""
    events = [Phase("loading the model", 0, 0, time=start),
              RunStarted("x", len(speeds), 0, 6, 1, 1, 1, "cpu", time=start + 1)]
    events += [Progress(i + 1, len(speeds), 0, 0.5, 1e-3, s, 0.0, time=start + 2 + i) for i, s in enumerate(speeds)]
    events += [ValidationLoss(step, loss, False, time=start + 2 + step) for step, loss in val]
    events += [ValidationLoss(step, loss, False, ema=True, time=start + 2 + step) for step, loss in ema]
    end = start + 10 + len(speeds)
    events.append(ending or LoraVerified(-1, lora, True, 8, 8, [], 1.5, True, time=end - 1))
    if ending is None:
        events.append(Finished("completed", len(speeds), lora, peak_memory_mb=peak, time=end))
    return events


@pytest.fixture
def outputs(tmp_path) -> Path:
    """Three finished-looking runs: "fast" and "slow" differ in learning rate and rank and share a sample prompt
    and seed; "other" samples another prompt and failed."""
    out = tmp_path / "outputs"
    fast_lora, slow_lora = out / "fast" / "fast.safetensors", out / "slow" / "slow.safetensors"
    write_run(out, "fast", {"train.learning_rate": 1e-3, "lora.rank": 4},
              run_events(str(fast_lora), [(0, 0.5), (3, 0.3), (6, 0.4)], [1.0, 2.0, 10.0, 2.5, 1.5, 3.0],
                         ema=[(3, 0.35), (6, 0.32)], peak=630.0),
              lora_bytes=3000, samples=((0, PROMPT, 0), (3, PROMPT, 0), (6, PROMPT, 0), (6, "a dog", 1)))
    write_run(out, "slow", {"train.learning_rate": 5e-4, "lora.rank": 8},
              run_events(str(slow_lora), [(0, 0.5), (2, 0.45), (4, 0.45)], [4.0, 4.0, 5.0, 5.0], start=200.0,
                         peak=2048.0),
              lora_bytes=6000, samples=((2, PROMPT, 0), (4, PROMPT, 0), (4, "a dog", 2)))
    write_run(out, "other", {"train.learning_rate": 1e-3, "lora.rank": 4, "sample.seed": 5},
              run_events("", [], [1.0], start=300.0, ending=RunError("out of memory", "out_of_memory", time=312)),
              samples=((1, "a cat", 5),))
    return out


def test_rows_hold_the_differing_settings_and_the_results(outputs):
    fast, slow = runs_compare.run_rows([outputs / "fast", outputs / "slow"])
    assert fast.settings == {"lora.rank": 4, "train.learning_rate": 1e-3}
    assert slow.settings == {"lora.rank": 8, "train.learning_rate": 5e-4}
    assert (fast.name, fast.state, fast.family, fast.model) == ("fast", "completed", "sd1", "base")
    assert (fast.best_loss, fast.best_step) == (0.3, 3)
    assert (fast.best_ema_loss, fast.best_ema_step) == (0.32, 6)
    assert (slow.best_loss, slow.best_step) == (0.45, 2)  # a tie: the earlier step
    assert slow.best_ema_loss is None
    assert fast.wall_time_s == pytest.approx(16.0) and slow.wall_time_s == pytest.approx(14.0)
    assert fast.steps_per_s == pytest.approx(2.25) and slow.steps_per_s == pytest.approx(4.5)  # medians
    assert (fast.peak_memory_mb, slow.peak_memory_mb) == (630.0, 2048.0)
    assert (fast.file_size_bytes, slow.file_size_bytes) == (3000, 6000)
    assert (fast.check, fast.check_ok) == ("ok 8/8", True)
    assert fast.lora_path == str(outputs / "fast" / "fast.safetensors")
    # Three runs: the sample seed differs too; a failed run has no file, no check, no peak.
    other = runs_compare.run_rows([outputs / "fast", outputs / "slow", outputs / "other"])[2]
    assert other.settings == {"lora.rank": 4, "train.learning_rate": 1e-3, "sample.seed": 5}
    assert (other.state, other.best_loss, other.file_size_bytes, other.peak_memory_mb) == ("failed", None, None,
                                                                                          None)
    assert runs_compare.run_rows([outputs / "fast"])[0].settings == {}  # nothing to differ from


def test_paths_are_shortened_as_far_as_they_stay_apart(tmp_path):
    values = ["/data/a/pictures", "/data/b/pictures", "/data/a/pictures", 3, "org/model"]
    assert runs_compare.shorten_paths(values) == ["a/pictures", "b/pictures", "a/pictures", 3, "org/model"]
    out = tmp_path / "outputs"
    one = write_run(out, "one", {"dataset.path": "/data/a/pictures"}, run_events("", [], [1.0]))
    two = write_run(out, "two", {"dataset.path": "/data/b/pictures"}, run_events("", [], [1.0]))
    assert [r.settings for r in runs_compare.run_rows([one, two])] == [{"dataset.path": "a/pictures"},
                                                                      {"dataset.path": "b/pictures"}]


def test_older_events_without_peak_memory_still_read(tmp_path):
    run = write_run(tmp_path / "outputs", "old", {}, run_events("", [], [1.0]))
    lines = (run / "events.jsonl").read_text().splitlines()
    old = json.loads(lines[-1])
    del old["peak_memory_mb"]
    (run / "events.jsonl").write_text("\n".join([*lines[:-1], json.dumps(old)]) + "\n")
    row = runs_compare.run_rows([run])[0]
    assert row.state == "completed" and row.peak_memory_mb is None


def test_validation_curves_overlay_the_runs(outputs):
    points = runs_compare.validation_curves([outputs / "fast", outputs / "slow"])
    by_run = {}
    for run, step, loss in points:
        by_run.setdefault(run, []).append((step, loss))
    assert by_run == {"fast": [(0, 0.5), (3, 0.3), (6, 0.4)], "fast (EMA)": [(3, 0.35), (6, 0.32)],
                      "slow": [(0, 0.5), (2, 0.45), (4, 0.45)]}


def test_samples_compare_like_with_like(outputs):
    found = runs_compare.side_by_side_samples([outputs / "fast", outputs / "slow"])
    assert found.pairs == [(PROMPT, 0)] and not found.note  # "a dog" has seed 1 in one run and 2 in the other
    assert [(c.run, c.step, c.caption) for c in found.cells] == [("fast", 6, "fast · step 6"),
                                                                 ("slow", 4, "slow · step 4")]
    assert all(Path(c.path).is_file() for c in found.cells)
    assert runs_compare.side_by_side_samples([outputs / "fast", outputs / "slow"], seed=3).cells == []
    assert "No common sample at seed 3" in runs_compare.side_by_side_samples([outputs / "fast"], seed=3).note
    one = runs_compare.side_by_side_samples([outputs / "fast"], prompt="a dog")
    assert [(c.prompt, c.seed, c.step) for c in one.cells] == [("a dog", 1, 6)]
    none = runs_compare.side_by_side_samples([outputs / "fast", outputs / "other"])
    assert none.cells == [] and "share no sample prompt and seed" in none.note and "'a cat' seed 5" in none.note
    # A deleted picture does not count.
    (outputs / "slow" / "samples" / "step000004-01.png").unlink()
    assert [c.step for c in runs_compare.side_by_side_samples([outputs / "slow"]).cells] == [2, 4]


def _cli(*args) -> int:
    from core.cli_runs import add_command

    parser = argparse.ArgumentParser(prog="python -m core")
    add_command(parser.add_subparsers(dest="command", required=True))
    parsed = parser.parse_args(["runs", *map(str, args)])
    return parsed.func(parsed)


def test_cli_prints_an_aligned_table_and_json(outputs, capsys):
    assert _cli(outputs) == 0
    lines = capsys.readouterr().out.splitlines()
    header, rows = lines[0], {line.split()[0]: line for line in lines[2:]}
    assert set(rows) == {"fast", "slow", "other"}
    for column in ("state", "best val loss", "time", "steps/s", "peak memory", "file size", "check",
                   "lora.rank", "train.learning_rate", "sample.seed"):
        assert column in header, column
    at = header.index("best val loss")
    assert rows["fast"][at:].startswith("0.3000 @ 3") and rows["slow"][at:].startswith("0.4500 @ 2")
    assert rows["fast"][header.index("peak memory"):].startswith("630 MB")
    assert rows["slow"][header.index("peak memory"):].startswith("2.0 GB")
    assert rows["slow"][header.index("train.learning_rate"):].startswith("0.0005")
    assert rows["fast"][header.index("time"):].startswith("0:16")
    assert rows["fast"][header.index("file size"):].startswith("3 KB")
    assert rows["fast"][header.index("model"):].startswith("base (sd1)")
    assert _cli(outputs / "fast", outputs / "slow", "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["best_step"], r["settings"]["lora.rank"]) for r in data] == [("fast", 3, 4), ("slow", 2, 8)]
    assert _cli(outputs / "missing") == 2
    assert "not a folder" in capsys.readouterr().err
    (outputs.parent / "empty").mkdir()
    assert _cli(outputs.parent / "empty") == 2


def test_ui_handlers(outputs):
    from ui import runs_tab
    from ui.settings import AppSettings

    settings = AppSettings(outputs.parent)
    listed = runs_tab.refresh_runs(settings, [str(outputs / "fast"), str(outputs / "gone")])
    assert {path for _, path in listed["choices"]} == {str(outputs / n) for n in ("fast", "slow", "other")}
    assert listed["value"] == [str(outputs / "fast")]
    # Nothing gone: the picks are left as the page has them (a run picked meanwhile is not undone).
    assert "value" not in runs_tab.refresh_runs(settings, [str(outputs / "fast")])

    table, plot, gallery, pair, message = runs_tab.compare([str(outputs / "fast"), str(outputs / "slow")])
    assert list(table["run"]) == ["fast", "slow"] and list(table["lora.rank"]) == ["4", "8"]
    assert list(table["best val loss"]) == ["0.3000 @ 3", "0.4500 @ 2"]
    assert {str(t) for t in plot.dtypes} == {"string", "int64", "float64"}
    assert list(plot["run"][:3]) == ["fast", "fast (EMA)", "slow"] and plot["loss"][:3].isna().all()  # placeholders
    assert len(plot) == 3 + 8
    colours = runs_tab.plot_colours([str(outputs / "fast"), str(outputs / "slow")])["color_map"]
    assert set(colours) == {"fast", "fast (EMA)", "slow"} and len(set(colours.values())) == 3
    assert [caption for _, caption in gallery["value"]] == ["fast · step 6", "slow · step 4"]
    assert gallery["columns"] == 2
    assert pair["value"] == runs_tab.ALL_PAIRS and (runs_tab.pair_label(PROMPT, 0),) * 2 in pair["choices"]
    assert "Pick two" not in message

    _, _, gallery, _, message = runs_tab.compare([str(outputs / "fast")], runs_tab.pair_label("a dog", 1))
    assert [caption for _, caption in gallery["value"]] == ["fast · step 6"] and "Pick two or more" in message
    _, _, gallery, pair, _ = runs_tab.compare([str(outputs / "fast")], "a prompt no run has")
    assert [caption for _, caption in gallery["value"]] == ["fast · step 6 · a photo of sks · seed 0",
                                                           "fast · step 6 · a dog · seed 1"]
    assert pair["value"] == runs_tab.ALL_PAIRS
    _, _, gallery, _, message = runs_tab.compare([str(outputs / "fast"), str(outputs / "other")])
    assert gallery["value"] == [] and "share no sample prompt and seed" in message
    table, plot, gallery, _, message = runs_tab.compare([])
    assert table.empty and plot.empty and gallery["value"] == [] and message == "Pick runs to compare."
    assert runs_tab.plot_colours([])["color_map"] == {}
    assert runs_tab.plot_colours([])["x_lim"] == [0, 40]  # whole-step ticks even for a short run


def test_ui_tab_builds(outputs):
    import gradio as gr

    from ui import runs_tab
    from ui.settings import AppSettings

    with gr.Blocks() as demo:
        built = runs_tab.build(AppSettings(outputs.parent))
    ids = {block.elem_id for block in demo.blocks.values() if getattr(block, "elem_id", None)}
    assert {"runs-select", "runs-refresh", "runs-table", "runs-plot", "runs-pair", "runs-samples",
            "runs-message"} <= ids
    refresh = built["on_load"][0]
    assert refresh.outputs == [built["runs"]] and len(refresh.fn([])["choices"]) == 3
    # The plot's colours go after its points, in their own update (else it keeps the curves of its first frame).
    plot = next(b._id for b in demo.blocks.values() if getattr(b, "elem_id", None) == "runs-plot")
    events = demo.config["dependencies"]
    picked = next(i for i, e in enumerate(events) if e["targets"] == [(built["runs"]._id, "change")])
    colours = next(e for e in events if e["trigger_after"] == picked)
    assert colours["api_name"].startswith("on_colours") and colours["outputs"] == [plot]


def test_a_real_run_records_its_peak_memory(tmp_path, tiny_model):
    import torch

    from core.events import jsonl_writer
    from core.training import train

    threads = torch.get_num_threads()  # the tiny model's many small ops: one thread, on a busy 2-core machine
    torch.set_num_threads(1)
    data = write_dataset(tmp_path / "pictures", n=4)
    cfg = tiny_config(tiny_model, data, tmp_path / "outputs", name="real",
                      **{"train.max_train_steps": 2, "sample.every_n_steps": 2, "sample.at_start": False,
                         "output.save_every_n_steps": 0, "output.save_state": False, "dataset.validation_split": 0.25})
    writer = {}

    def to_file(event):  # the folder is the run's once the trainer has claimed it, as the CLI writes it
        writer.setdefault("w", jsonl_writer(cfg.run_dir / "events.jsonl"))(event)

    try:
        train.run(cfg, EventLog(to_file))
    finally:
        torch.set_num_threads(threads)
    row = runs_compare.run_rows([cfg.run_dir])[0]
    # MiB: on CUDA the GPU memory allocated (the tiny model's is small), else this process's peak RSS (torch alone
    # takes more than 100 MiB)
    floor = 0 if torch.cuda.is_available() else 100
    assert row.peak_memory_mb is not None and floor < row.peak_memory_mb < 64_000
    assert row.state == "completed" and row.family == "sd1" and row.best_step == 2
    assert row.file_size_bytes == (cfg.run_dir / "real.safetensors").stat().st_size
    assert row.steps_per_s and row.steps_per_s > 0 and row.wall_time_s > 0
    assert [c.step for c in runs_compare.side_by_side_samples([cfg.run_dir]).cells] == [2]
