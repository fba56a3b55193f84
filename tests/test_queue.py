"""The run queue and sweeps (core/training/queue.py, ``python -m core queue``)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core import config as config_mod
from core.config import ConfigError
from core.training.queue import RunQueue, parse_sweep, sweep_configs
from core.training.run_folder import RunPaths, run_status
from tests.conftest import cli, tiny_config, write_dataset

ROOT = Path(__file__).resolve().parents[1]


def quick(tiny_model, tmp_path, name="q", **overrides):
    settings = {"sample.prompts": [], "output.save_every_n_steps": 0, "train.max_train_steps": 2,
                "train.optimizer": "adamw"} | overrides
    return config_mod.resolve_paths(tiny_config(tiny_model, write_dataset(tmp_path / "pictures", n=3),
                                                tmp_path / "outputs", name, **settings))


def test_parse_sweep_reads_typed_values_and_refuses_bad_ones():
    assert parse_sweep("train.learning_rate=1e-4, 3e-4") == ("train.learning_rate", [1e-4, 3e-4])
    assert parse_sweep("train.optimizer=adamw8bit,prodigy") == ("train.optimizer", ["adamw8bit", "prodigy"])
    for bad, said in [("learning_rate=1", "section.key"), ("train.learning_rate=", "at least one value"),
                      ("lora.rank=4,4", "twice")]:
        with pytest.raises(ConfigError, match=said):
            parse_sweep(bad)


def test_sweep_makes_one_checked_config_per_value_or_pair(tiny_model, tmp_path):
    config = quick(tiny_model, tmp_path, "photos")
    grid = sweep_configs(config, [parse_sweep("train.learning_rate=1e-4,5e-4"), parse_sweep("lora.rank=4,8")])
    assert [c.output.name for c, _ in grid] == ["photos-lr0.0001-rank4", "photos-lr0.0001-rank8",
                                                "photos-lr0.0005-rank4", "photos-lr0.0005-rank8"]
    assert [(c.train.learning_rate, c.lora.rank) for c, _ in grid] == [(1e-4, 4), (1e-4, 8), (5e-4, 4), (5e-4, 8)]
    assert grid[1][1] == {"train.learning_rate": 1e-4, "lora.rank": 8}
    # A value the setting cannot take is refused before anything is queued, naming the setting and value.
    with pytest.raises(ConfigError, match=r"train.learning_rate = -1.*learning_rate"):
        sweep_configs(config, [("train.learning_rate", [1e-4, -1])])
    with pytest.raises(ConfigError, match="unknown key lora.rnak"):
        sweep_configs(config, [parse_sweep("lora.rnak=4,8")])
    with pytest.raises(ConfigError, match="two as a grid"):
        sweep_configs(config, [("lora.rank", [4]), ("lora.alpha", [4]), ("train.batch_size", [1])])


def test_queue_keeps_order_moves_cancels_and_survives_a_new_reader(tiny_model, tmp_path):
    config = quick(tiny_model, tmp_path, "photos")
    queue = RunQueue(config.output.dir)
    first = queue.add(config)[0]
    sweep = queue.add(config, [parse_sweep("lora.rank=4,8")])
    again = queue.add(config)[0]
    # Names never collide with a queued run: the second plain add is photos-2.
    assert [e.name for e in queue.entries()] == ["photos", "photos-rank4", "photos-rank8", "photos-2"]
    assert again.name == "photos-2" and sweep[0].group == sweep[1].group != ""
    assert config_mod.load(sweep[1].config).lora.rank == 8  # the frozen config of each entry
    queue.move(again.id, "top")
    queue.move(sweep[1].id, "up")
    reread = RunQueue(config.output.dir)  # what an app restarted later reads
    assert [e.name for e in reread.entries()] == ["photos-2", "photos", "photos-rank8", "photos-rank4"]
    assert reread.cancel(first.id).state == "cancelled"
    with pytest.raises(ConfigError, match="not waiting"):
        reread.move(first.id, "up")
    with pytest.raises(ConfigError, match="already ended"):
        reread.cancel(first.id)
    assert reread.clear() == 1 and not Path(first.config).exists()
    assert [e.state for e in reread.entries()] == ["waiting"] * 3
    # An entry left "running" by a worker that died goes back to waiting.
    with reread._edit() as data:
        data["entries"][0]["state"] = "running"
    reread._recover()
    assert reread.entries()[0].state == "waiting" and "continues from its last save" in reread.entries()[0].message


def test_queue_refuses_what_would_fail_later(tiny_model, tmp_path):
    config = quick(tiny_model, tmp_path, "photos")
    for picture in Path(config.dataset.path).iterdir():
        picture.unlink()
    with pytest.raises(ConfigError, match="dataset.path.*nothing to train"):
        RunQueue(config.output.dir).add(config)
    assert RunQueue(config.output.dir).entries() == []


def test_the_worker_moves_on_after_a_stop_and_a_failure(tiny_model, tmp_path):
    """Three entries for a detached worker: a long run that is cancelled while it trains (it stops after a step and
    saves its LoRA), a run whose dataset vanished after it was queued (it fails), and a one-value sweep queued from
    the command line (it trains with the swept value). The worker's lock shows it alive meanwhile, and goes."""
    config = quick(tiny_model, tmp_path, "long", **{"train.max_train_steps": 400})
    outputs = Path(config.output.dir)
    queue = RunQueue(outputs)
    long = queue.add(config)[0]
    doomed_data = write_dataset(tmp_path / "doomed", n=2)
    queue.add(config_mod.with_values(config, {"dataset.path": str(doomed_data), "output.name": "doomed"}))
    toml = tmp_path / "run.toml"
    config_mod.save(config_mod.with_values(config, {"output.name": "photos", "train.max_train_steps": 2}), toml)
    assert cli("queue", "add", toml, "--sweep", "train.learning_rate=2e-3") == 0
    shutil.rmtree(doomed_data)
    assert queue.start_worker() and queue.worker() is not None
    assert not queue.start_worker()  # one worker per queue
    deadline = time.time() + 400
    while run_status(outputs / "long").step < 1:
        assert time.time() < deadline, (queue.folder / "worker.log").read_text()
        time.sleep(0.2)
    queue.cancel(long.id)
    while queue.worker() is not None:
        assert time.time() < deadline, (queue.folder / "worker.log").read_text()
        time.sleep(0.2)
    entries = queue.entries()
    assert [(e.name, e.state) for e in entries] == [("long", "stopped"), ("doomed", "failed"),
                                                     ("photos-lr0.002", "completed")]
    assert entries[0].message.startswith("stopped at step") and RunPaths(outputs / "long").final_lora.is_file()
    assert "dataset" in entries[1].message and "doomed" in entries[1].message
    assert entries[0].ended <= entries[1].started and entries[1].ended <= entries[2].started
    run_dir = outputs / "photos-lr0.002"
    assert RunPaths(run_dir).final_lora.is_file() and run_status(run_dir).state == "completed"
    assert config_mod.load(RunPaths(run_dir).config, check_paths=False).train.learning_rate == 2e-3
    assert "trained 3 run(s)" in (queue.folder / "worker.log").read_text()
    listed = subprocess.run([sys.executable, "-m", "core", "queue", "list", "--outputs", str(outputs), "--json"],
                            cwd=ROOT, capture_output=True, text=True, check=True)
    assert [e["state"] for e in json.loads(listed.stdout)["entries"]] == ["stopped", "failed", "completed"]


# ------------------------------------------------------------ the Train tab's queue box (handlers)


def test_queue_box_adds_the_forms_run_with_a_sweep_and_acts_on_entries(tiny_model, tmp_path):
    from ui import queue_panel, train_tab
    from ui.settings import AppSettings

    settings = AppSettings(tmp_path / "home")
    settings.ensure()
    values = train_tab.config_to_form(quick(tiny_model, tmp_path, "photos"))
    form = lambda: train_tab.form_to_config(values, settings)  # noqa: E731
    message, state, rows, picker = queue_panel.add_to_queue(settings, form, [("lora.rank", "4, 8"), (None, "")],
                                                            start=False)
    assert "Queued 2 run(s): photos-rank4, photos-rank8" in message and "2 waiting" in state
    assert [row[1:4] for row in rows] == [["photos-rank4", "lora.rank = 4", "… waiting"],
                                          ["photos-rank8", "lora.rank = 8", "… waiting"]]
    assert [value for _, value in picker["choices"]] == [1, 2]
    # A bad sweep names the setting and the value; nothing is queued.
    message, *_ = queue_panel.add_to_queue(settings, form, [("train.learning_rate", "1e-4, zero")], start=False)
    assert message.startswith("⚠️") and "train.learning_rate = 'zero'" in message
    message, *_ = queue_panel.add_to_queue(settings, lambda: (_ for _ in ()).throw(ConfigError("lora.rank bad")),
                                           [], start=False)
    assert message == "⚠️ lora.rank bad"
    _, _, rows, _ = queue_panel.act(settings, "down", 1)
    assert [row[1] for row in rows] == ["photos-rank8", "photos-rank4"]
    message, _, rows, _ = queue_panel.act(settings, "cancel", 1)
    assert "cancelled" in message and rows[1][3] == "– cancelled"
    assert queue_panel.act(settings, "cancel", None)[0] == "⚠️ pick an entry of the queue first"
    message, _, rows, _ = queue_panel.act(settings, "clear", None)
    assert "Forgot 1" in message and len(rows) == 1
    # An app started later does not restart a queue the user paused.
    queue_panel.act(settings, "pause", None)
    assert not queue_panel.resume_on_start(settings) and "paused" in queue_panel.view(settings)[1]
    assert queue_panel.view(settings)[0] == {"__type__": "update"}  # the refresh keeps the last action's message


def test_the_train_tab_follows_a_run_another_process_started(tiny_model, tmp_path):
    """The queue's next run (or one started from a terminal) takes over the live view once the last one ended."""
    import os

    import psutil

    from core.fsutil import write_json
    from core.training.run_folder import TrainerLock
    from ui.runner import AttachedRun, RunManager

    outputs = tmp_path / "outputs"
    manager = RunManager(outputs)
    assert manager.follow_live() is None
    run_dir = outputs / "queued"
    run_dir.mkdir(parents=True)
    lock = TrainerLock(os.getpid(), psutil.Process().create_time(), time.time())
    write_json(RunPaths(run_dir).lock, lock.__dict__)
    followed = manager.follow_live()
    assert isinstance(followed, AttachedRun) and followed.run_dir == run_dir
