"""What a new user hits in a first session (issue 14): each surprise as a handler test."""

import time

from conftest import tiny_config, write_dataset

from core.events import Finished, Progress, jsonl_writer
from core.training.run_folder import RunPaths
from ui import train_tab
from ui.runner import RunManager
from ui.settings import AppSettings


def test_a_taken_run_name_gets_a_free_one_and_the_earlier_run_is_kept(tiny_model, tmp_path):
    settings = AppSettings(tmp_path / "home")
    settings.ensure()
    earlier = settings.outputs_dir / "photos"
    earlier.mkdir(parents=True)
    write = jsonl_writer(RunPaths(earlier).events)
    write(Progress(6, 6, 0, 0.1, 1e-4, 1.0, 0.0))
    write(Finished("completed", 6, str(earlier / "photos.safetensors")))
    (earlier / "photos.safetensors").write_bytes(b"the earlier run's file")
    (settings.outputs_dir / "photos-2").mkdir()  # a folder by that name too: the next free one is -3
    (settings.outputs_dir / "photos-2" / "notes.txt").write_text("mine")
    cfg = tiny_config(tiny_model, write_dataset(tmp_path / "d", n=2), settings.outputs_dir, name="photos",
                      **{"train.max_train_steps": 100000, "sample.prompts": []})
    manager = RunManager(settings.outputs_dir)
    status, error, name = train_tab.start_run(settings, manager, train_tab.config_to_form(cfg))
    try:
        assert name == "photos-3" and error["visible"] is False and error["value"] == "", status
        assert "Starting **photos-3**" in status and "**photos** is an earlier run, kept" in status
        assert "python -m core" not in status  # no command-line wording in the app
        assert manager.active.run_dir.name == "photos-3"  # the live view follows the new run, not the old one
    finally:
        manager.stop()
        manager.wait(timeout=300)
    assert (earlier / "photos.safetensors").read_bytes() == b"the earlier run's file"


def test_runs_that_cannot_train_are_refused_in_the_form(tiny_model, tmp_path):
    """Learning rate 0, an empty or wholly excluded dataset, a model missing a part: refused at once, the
    setting named, and no process started."""
    import shutil

    from core.data.manifest import set_decision

    settings = AppSettings(tmp_path / "home")
    settings.ensure()
    manager = RunManager(settings.outputs_dir)
    data = write_dataset(tmp_path / "d", n=2)

    def start(**overrides):
        cfg = tiny_config(tiny_model, data, settings.outputs_dir, name="r", **overrides)
        return train_tab.start_run(settings, manager, {**train_tab.config_to_form(cfg)})[0]

    form = train_tab.config_to_form(tiny_config(tiny_model, data, settings.outputs_dir, name="r"))
    status = train_tab.start_run(settings, manager, {**form, "train.learning_rate": 0})[0]
    assert status.startswith("⚠️") and "train.learning_rate" in status and manager.active is None
    for picture in data.glob("*.png"):
        set_decision(data, picture.name, "exclude", "test")
    status = start()
    assert "dataset.path" in status and "all 2 of its pictures are excluded" in status and manager.active is None
    broken = tmp_path / "broken model"
    shutil.copytree(tiny_model, broken)
    shutil.rmtree(broken / "vae")
    for picture in data.glob("*.png"):
        set_decision(data, picture.name, None, "")
    form = train_tab.config_to_form(tiny_config(broken, data, settings.outputs_dir, name="r"))
    status = train_tab.start_run(settings, manager, form)[0]
    assert "model.path" in status and "missing its vae" in status and manager.active is None


def test_progress_tells_what_is_happening(tiny_model, tmp_path):
    """Before the first step: the phase, not "step 0/0 · ETA 0:00"; after the last: the final validation,
    saving and checking, in that order, with no time left shown; a run that ended shows no ETA."""
    from core.events import Phase, RunStarted
    from core.training import train
    from tests.conftest import EventLog
    from ui.runner import RunSummary

    summary = RunSummary(tmp_path / "run")
    summary.apply(Phase("caching training latents", 3, 9))
    html = train_tab.progress_html(summary, running=True)
    assert "caching training latents 3/9" in html and "step 0/0" not in html and "ETA" not in html
    summary.apply(RunStarted(str(tmp_path / "run"), 6, 0, 4, 1, 1, 1, "cpu", False))
    summary.apply(Progress(6, 6, 1, 0.1, 1e-4, 2.0, 0.0))
    summary.apply(Phase("final validation and samples", 0, 0))
    html = train_tab.progress_html(summary, running=True)
    assert "final validation and samples" in html and "step 6/6" in html and "ETA" not in html

    log = EventLog()
    cfg = tiny_config(tiny_model, write_dataset(tmp_path / "d", n=2), tmp_path / "out", **{
        "train.max_train_steps": 2, "sample.prompts": [], "output.save_state": False})
    train.run(cfg, log, final_check=True)
    names = [e.name for e in log.of("phase")]
    after = names[names.index("final validation and samples"):]
    assert after == ["final validation and samples", "saving the LoRA", "checking the LoRA file"]
    assert log.events[-1].type == "finished"


def test_steps_per_second_leave_out_validation_and_samples(monkeypatch):
    from core.training import loop

    clock = {"now": 0.0}
    monkeypatch.setattr(loop.time, "perf_counter", lambda: clock["now"])
    rate = loop._Rate()
    for _ in range(3):  # a step a second
        clock["now"] += 1.0
        assert rate.tick() == 1.0
    clock["now"] += 30.0  # validation and samples between two steps
    rate.skip(30.0)
    clock["now"] += 1.0
    assert rate.tick() == 1.0  # the next step is still a step a second: the time left does not jump


def test_the_prompt_tab_lists_final_files_first_with_short_names_and_marks_failed_ones(tmp_path):
    from core.events import LoraVerified
    from ui.settings import lora_choices

    outputs = tmp_path / "outputs"
    for name, ok in (("older", False), ("newer", True)):
        run = outputs / name
        run.mkdir(parents=True)
        for file in (f"{name}-step000010.safetensors", f"{name}.safetensors"):
            (run / file).write_bytes(b"x")
        jsonl_writer(RunPaths(run).events)(LoraVerified(10, str(run / f"{name}.safetensors"), ok, 4, 4,
                                                         [] if ok else ["no module maps"]))
        time.sleep(0.05)  # newest run first
    (outputs / "newer" / "renamed by hand.safetensors").write_bytes(b"x")
    labels = [label for label, _ in lora_choices(outputs)]
    assert labels == ["newer.safetensors", "✗ older.safetensors (failed its check)", "newer-step000010.safetensors",
                      "newer/renamed by hand.safetensors", "older-step000010.safetensors"]
    assert dict(lora_choices(outputs))["newer.safetensors"] == str(outputs / "newer" / "newer.safetensors")


def test_remove_and_restore_and_the_buttons_follow_the_pick(tmp_path):
    from ui import dataset_tab, removed_box

    settings = AppSettings(tmp_path / "home")
    settings.ensure()
    write_dataset(settings.datasets_dir / "dogs", n=3)
    assert [u["interactive"] for u in removed_box.picked_buttons("")] == [False, False]  # nothing picked
    assert [u["interactive"] for u in removed_box.picked_buttons("img1.png")] == [True, True]
    message, gallery, counts, *_ = dataset_tab.on_remove(settings, "dogs", dataset_tab.TOP_LEVEL, "img1.png")
    assert "Removed `img1.png`" in message and "**2** images" in counts
    assert removed_box.removed_list(settings, "dogs", dataset_tab.TOP_LEVEL)["choices"] == ["img1.png"]
    message, gallery, counts, listed = removed_box.on_restore(settings, "dogs", dataset_tab.TOP_LEVEL, "img1.png")
    assert message == "Restored `img1.png`." and "**3** images" in counts and listed["choices"] == []
    assert (settings.datasets_dir / "dogs" / "img1.txt").read_text(encoding="utf-8") == "a photo of sks dog number 1"
    message, *_ = removed_box.on_restore(settings, "dogs", dataset_tab.TOP_LEVEL, None)
    assert message == "⚠️ pick a removed picture to restore first"


def test_the_health_reports_counts_follow_exclude_and_keep_at_once(tmp_path):
    from ui import dataset_tab, health_panel

    folder = write_dataset(tmp_path / "dogs", n=4, size=(40, 40))  # all below 512 px: each has a warning
    report, _ = health_panel.check_for_run(folder, 512)
    assert report.summary["usable"] == 4 and report.summary["warnings"] == 4
    health_panel.decide(folder, "img1.png", "exclude", report)
    health_panel.decide(folder, "img2.png", "keep", report)
    after = health_panel.with_decisions(report, folder)
    assert {k: after.summary[k] for k in ("usable", "excluded", "kept", "warnings")} == \
        {"usable": 3, "excluded": 1, "kept": 1, "warnings": 2}
    assert "**3** usable of 4 pictures" in health_panel.summary(after)
    assert "**1** excluded from training" in dataset_tab.counts_text(folder)
    assert ("img1.png (excluded)" in [label for _, label in dataset_tab.gallery_items(folder)])


def test_dropping_the_same_names_again_says_replaced_and_already_there(tmp_path):
    from ui import dataset_tab

    settings = AppSettings(tmp_path / "home")
    settings.ensure()
    (settings.datasets_dir / "dogs").mkdir(parents=True)
    first = write_dataset(tmp_path / "day1", n=3)
    files = sorted(str(p) for p in first.iterdir() if p.suffix == ".png")
    dataset_tab.on_upload(settings, "dogs", dataset_tab.TOP_LEVEL, files)
    edited = write_dataset(tmp_path / "day2", n=2, seed=5)  # two of the names again, other pixels, no captions
    again = [str(p) for p in edited.iterdir() if p.suffix == ".png"] + [files[2]]
    message = dataset_tab.on_upload(settings, "dogs", dataset_tab.TOP_LEVEL, again)[1]
    assert message.startswith("Added 0 image(s) and 0 caption file(s). Replaced 2:") and "1 were already" in message
