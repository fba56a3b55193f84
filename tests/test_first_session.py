"""What a new user hits in a first session (issue 14): each surprise as a handler test."""

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
        assert name == "photos-3" and error == "", status
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
