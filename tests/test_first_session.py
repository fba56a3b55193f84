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
