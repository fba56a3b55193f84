"""The app's handlers and helpers as plain functions (no browser)."""

import time

import numpy as np
import pytest

from core.config import ConfigError
from tests.conftest import EventLog, tiny_config, write_dataset
from ui import presets, train_tab
from ui.runner import RunBusyError, RunManager, list_runs, summarize
from ui.settings import AppSettings, find_loras, find_models


@pytest.fixture
def settings(tmp_path):
    s = AppSettings(tmp_path / "home")
    s.ensure()
    return s


def test_form_round_trips_the_config(settings, tiny_model, tmp_path):
    cfg = tiny_config(tiny_model, write_dataset(tmp_path / "d", n=2), settings.outputs_dir)
    cfg.sample.prompts = ["a photo of sks", "sks at the beach"]
    values = train_tab.config_to_form(cfg)
    assert values["sample.prompts"] == "a photo of sks\nsks at the beach"
    assert "output.dir" not in values  # the app keeps runs in its own folder
    values["lora.rank"] = 8.0  # gr.Number gives floats
    back = train_tab.form_to_config(values, settings)
    assert back.lora.rank == 8 and back.sample.prompts == cfg.sample.prompts
    assert back.output.dir == str(settings.outputs_dir)


def test_form_errors_name_the_field(settings, tiny_model, tmp_path):
    values = train_tab.config_to_form(tiny_config(tiny_model, write_dataset(tmp_path / "d", n=2), tmp_path))
    values["dataset.resolution"] = 500
    with pytest.raises(ConfigError, match="dataset.resolution = 500 must be a multiple of 8"):
        train_tab.form_to_config(values, settings)
    values["dataset.resolution"] = None
    with pytest.raises(ConfigError, match="dataset.resolution is empty"):
        train_tab.form_to_config(values, settings)


def test_every_config_field_has_a_widget_and_basic_ones_come_first():
    fields = train_tab.all_fields()
    assert set(train_tab.basic_fields()) <= set(fields)
    assert set(fields) == set(train_tab.basic_fields()) | set(train_tab.advanced_fields())
    assert "train.optimizer" in train_tab.advanced_fields()



def test_steps_readout(tmp_path):
    data = write_dataset(tmp_path / "d", n=11)
    text = train_tab.steps_readout({"dataset.path": str(data), "dataset.repeats": 2, "train.batch_size": 2,
                                    "train.max_train_epochs": 3, "dataset.validation_split": 0.1})
    assert "10 images × 2 repeats × 3 epochs / batch 2 = **30**" in text and "1 held out" in text
    text = train_tab.steps_readout({"dataset.path": str(data), "dataset.repeats": 1, "train.batch_size": 1,
                                    "train.max_train_epochs": 0, "train.max_train_steps": 25,
                                    "dataset.validation_split": 0.1})
    assert "10 steps per epoch" in text and "**25** steps ≈ 2.5 epochs" in text
    assert "Pick a dataset" in train_tab.steps_readout({"dataset.path": str(tmp_path / "none")})
    from core.data.manifest import set_decision

    set_decision(data, "img1.png", "exclude")  # excluded pictures do not count
    text = train_tab.steps_readout({"dataset.path": str(data), "dataset.repeats": 1, "train.batch_size": 1,
                                    "train.max_train_epochs": 1, "dataset.validation_split": 0.1})
    assert "9 images × 1 repeats × 1 epochs / batch 1 = **9**" in text


def test_presets_builtin_saved_and_refused(settings):
    names = presets.list_presets(settings.presets_dir)
    assert names[:5] == ["6 GB GPU", "8 GB GPU", "12 GB GPU", "16 GB GPU", "24 GB GPU"]
    for name in names[:4]:  # every built-in preset is a valid partial config
        raw = presets.load_preset(settings.presets_dir, name)
        from core import config as config_mod

        config_mod.from_dict(raw, check_paths=False)
    presets.save_preset(settings.presets_dir, "mine", {"lora": {"rank": 12}})
    assert presets.load_preset(settings.presets_dir, "mine") == {"lora": {"rank": 12}}
    assert "mine" in presets.list_presets(settings.presets_dir)
    with pytest.raises(ConfigError, match="built-in"):
        presets.save_preset(settings.presets_dir, "8 GB GPU", {})
    with pytest.raises(ConfigError, match="file name"):
        presets.save_preset(settings.presets_dir, "a/b", {})


def test_run_manager_trains_refuses_a_second_run_and_stops(settings, tiny_model, tmp_path):
    data = write_dataset(tmp_path / "d", n=3)
    manager = RunManager(settings.outputs_dir)
    cfg = tiny_config(tiny_model, data, settings.outputs_dir, name="ui-run",
                      **{"train.max_train_steps": 100000, "sample.prompts": [], "output.save_every_n_steps": 0})
    run = manager.start(cfg)
    with pytest.raises(RunBusyError, match="already training"):
        manager.start(tiny_config(tiny_model, data, settings.outputs_dir, name="other"))
    deadline = time.time() + 300
    while time.time() < deadline and run.poll().step < 2:
        assert run.running, run.log_tail()
        time.sleep(0.3)
    assert manager.stop()
    assert manager.wait(timeout=120) == 0
    summary = run.poll()
    assert summary.finished == "stopped" and summary.error == "" and summary.step >= 2
    assert (settings.outputs_dir / "ui-run" / "ui-run.safetensors").is_file()
    assert "step" in run.log_tail()
    assert list_runs(settings.outputs_dir) == [settings.outputs_dir / "ui-run"]
    assert summarize(settings.outputs_dir / "ui-run").finished == "stopped"
    assert "ui-run.safetensors" in train_tab.run_files_text(settings.outputs_dir / "ui-run")
    assert find_loras(settings.outputs_dir) == [str(settings.outputs_dir / "ui-run" / "ui-run.safetensors")]
    assert not manager.stop()  # nothing running any more


@pytest.mark.slow  # the app's path is the same for every family (SD 1.x runs by default); SDXL's costs 8 s
def test_the_app_trains_an_sdxl_lora_and_shows_its_check(settings, tiny_sdxl, tmp_path):
    manager = RunManager(settings.outputs_dir)
    cfg = tiny_config(tiny_sdxl, write_dataset(tmp_path / "d", n=3), settings.outputs_dir, name="xl-run",
                      **{"train.max_train_steps": 2, "sample.every_n_steps": 0, "output.save_state": False})
    run = manager.start(cfg)
    assert manager.wait(timeout=600) == 0, run.log_tail()
    summary = run.poll()
    assert summary.finished == "completed" and summary.error == ""
    assert summary.check.ok and summary.check.step == -1 and summary.check.loads
    html = train_tab.progress_html(summary, running=False)
    assert "check of xl-run.safetensors" in html and "data-ok='true'" in html
    assert len(summary.samples) == 2  # before the first step and at the end


def test_failed_run_shows_the_engine_error_line(settings, tiny_model, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "broken.png").write_bytes(b"")
    manager = RunManager(settings.outputs_dir)
    run = manager.start(tiny_config(tiny_model, empty, settings.outputs_dir, name="bad"))
    manager.wait(timeout=300)
    summary = run.poll()
    assert summary.error.startswith("dataset: no readable image") and "Traceback" not in summary.error


def test_find_models(settings, tiny_model):
    import shutil

    shutil.copytree(tiny_model, settings.models_dir / "tiny")
    (settings.models_dir / "not-a-model").mkdir()
    assert find_models(settings.models_dir) == [str(settings.models_dir / "tiny")]
    from ui.settings import model_choices

    assert model_choices(settings.models_dir) == [("tiny — SD 1.x", str(settings.models_dir / "tiny"))]
    # single files: base checkpoints are listed with their family; LoRAs and converted copies are not
    import torch
    from safetensors.torch import save_file

    save_file({"conditioner.embedders.1.model.token_embedding.weight": torch.zeros(1)},
              settings.models_dir / "pony xl.safetensors")
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, settings.models_dir / "a lora.safetensors")
    shutil.copytree(tiny_model, settings.models_dir / ".diffusers" / "pony xl-123")
    assert model_choices(settings.models_dir) == [
        ("tiny — SD 1.x", str(settings.models_dir / "tiny")),
        ("pony xl.safetensors — SDXL, single file", str(settings.models_dir / "pony xl.safetensors"))]


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_previewer_keeps_the_pipeline_and_switches_loras(family, tiny_model, tiny_sdxl, tmp_path):
    from core.lora.preview import Previewer
    from core.training import train
    from tests.conftest import EventLog

    tiny_model = tiny_sdxl if family == "sdxl" else tiny_model  # the Prompt tab's engine, per family
    result = train.run(tiny_config(tiny_model, write_dataset(tmp_path / "d", n=2), tmp_path / "o",
                                   **{"sample.prompts": [], "output.save_every_n_steps": 3,
                                      "output.save_state": False, "train.learning_rate": 1e-2}), EventLog())
    previewer = Previewer(device="cpu")
    kw = dict(seed=1, steps=2, width=64, height=64)
    base = np.asarray(previewer.generate(str(tiny_model), "a photo of sks", **kw), dtype=np.int16)
    full = np.asarray(previewer.generate(str(tiny_model), "a photo of sks", lora=str(result.lora_path), **kw),
                      dtype=np.int16)
    zero = np.asarray(previewer.generate(str(tiny_model), "a photo of sks", lora=str(result.lora_path),
                                         scale=0.0, **kw), dtype=np.int16)
    again = np.asarray(previewer.generate(str(tiny_model), "a photo of sks", **kw), dtype=np.int16)
    assert previewer.loads == 1
    assert np.abs(full - base).max() > 0
    assert np.abs(zero - base).max() <= 1 and np.abs(again - base).max() == 0
    step3 = result.run_dir / "test-lora-step000003.safetensors"
    told = []
    grid = previewer.grid(str(tiny_model), "a photo of sks", [str(step3), str(result.lora_path)], [0.5, 1.0],
                          on_cell=lambda done, total: told.append((done, total)), **kw)
    assert told == [(1, 4), (2, 4), (3, 4), (4, 4)]  # the Prompt tab's per-picture progress
    # 64 px pictures are shown 256 px (4x, nearest), with a label column: readable, not a thumbnail.
    assert grid.size == (230 + 2 * (256 + 16), 8 + 26 + 2 * (256 + 8)) and previewer.loads == 1


def test_health_report_view_lists_flagged_files(tmp_path):
    from PIL import Image

    from ui import health_panel

    folder = write_dataset(tmp_path / "d", n=3, size=(600, 600))
    (folder / "broken.png").write_bytes(b"")
    Image.open(folder / "img1.png").save(folder / "img1 copy.png")
    report = health_panel.check(folder)
    rows = {row[0]: row for row in health_panel.rows(report)}
    assert rows["broken.png"][1] == "error" and "empty" in rows["broken.png"][3]
    assert rows["img1.png"][3].startswith("same pixels as img1 copy.png")  # the later name is the copy
    assert "img 0 ça.png" not in rows  # a clean picture is not flagged
    summary = health_panel.summary(report)
    assert "**1** cannot be used" in summary and "same pixels" in summary
    shown = health_panel.gallery(report, folder)
    # unreadable files are only in the table
    assert [label for _, label in shown] == ["img1 copy.png — caption missing", "img1.png — duplicate"]
    assert health_panel.shown_files(report) == ["img1 copy.png", "img1.png"]


def test_health_decisions_exclude_keep_undo_and_copies(tmp_path, tiny_model):
    from PIL import Image

    from core.data.manifest import load_manifest
    from core.training import train
    from ui import dataset_tab, health_panel

    folder = write_dataset(tmp_path / "d", n=4, size=(80, 80))
    Image.open(folder / "img1.png").save(folder / "img1 again.png")
    Image.open(folder / "img2.png").save(folder / "img2 again.png")
    report = health_panel.check(folder)
    message = health_panel.decide(folder, "img1.png", "exclude", report)
    assert "excluded from training" in message and (folder / "img1.png").is_file()
    assert load_manifest(folder).images["img1.png"].reason == "small, duplicate"
    report = health_panel.with_decisions(report, folder)
    assert {r[0]: r[2] for r in health_panel.rows(report)}["img1.png"] == "excluded"
    assert "excluded" in health_panel.details(report, "img1.png")
    health_panel.decide(folder, "img2.png", "keep", report)
    health_panel.decide(folder, "img1.png", None, report)
    assert load_manifest(folder).decision("img1.png") is None
    assert load_manifest(folder).decision("img2.png") == "keep"
    # the copy sorted second in each group goes, unless a decision was already made about it
    assert "Excluded 1 duplicate" in health_panel.exclude_copies(folder, health_panel.check(folder))
    current = load_manifest(folder)
    assert current.is_excluded("img1.png") and current.decision("img2.png") == "keep"
    assert "img1.png (excluded)" in [label for _, label in dataset_tab.gallery_items(folder)]
    assert "**1** excluded from training" in dataset_tab.counts_text(folder)
    # the engine trains without them
    cfg = tiny_config(tiny_model, folder, tmp_path / "out", **{"sample.prompts": [], "train.max_train_steps": 1,
                                                              "output.save_state": False,
                                                              "dataset.validation_split": 0.0})
    log = EventLog()
    train.run(cfg, log)
    assert log.of("run_started")[0].num_train_images == 5


def test_concept_repeats_table(tmp_path):
    from core.data.manifest import ManifestError, load_manifest
    from ui import health_panel

    folder = write_dataset(tmp_path / "d", n=2)
    write_dataset(folder / "close ups", n=3)
    write_dataset(folder / "full body", n=1)
    assert health_panel.concept_rows(folder) == [["close ups", 3, 1], ["full body", 1, 1]]
    assert "2 folder(s)" in health_panel.save_concepts(folder, [["close ups", 3, 4], ["full body", 1, 1]])
    assert load_manifest(folder).concepts == {"close ups": 4}
    assert health_panel.concept_rows(folder)[0] == ["close ups", 3, 4]
    with pytest.raises(ManifestError, match="whole number"):
        health_panel.save_concepts(folder, [["close ups", 3, "lots"]])


def test_concept_folders_in_the_dataset_view(tmp_path):
    from core.data import dataset_store as store
    from core.data.manifest import set_decision
    from ui import dataset_tab

    root = store.create_dataset(tmp_path / "datasets", "mine")
    write_dataset(root, n=2)
    assert dataset_tab.subfolders(root) == [dataset_tab.TOP_LEVEL]
    view = dataset_tab.view_folder(root, "close ups")
    assert view == root / "close ups" and not view.exists()
    assert "is new" in dataset_tab.counts_text(view, root)
    view.mkdir()
    report = store.import_files(view, [str(p) for p in sorted(root.glob("img*.png"))])
    assert len(report.added) == 2 and (view / "img1.png").is_file()
    assert dataset_tab.subfolders(root) == [dataset_tab.TOP_LEVEL, "close ups"]
    set_decision(root, "close ups/img1.png", "exclude")
    labels = [label for _, label in dataset_tab.gallery_items(view, root)]
    assert labels == ["img 0 ça.png", "img1.png (excluded)"]
    assert "**1** excluded" in dataset_tab.counts_text(view, root)
    assert "excluded" not in dataset_tab.counts_text(root)  # the top level has its own pictures
    with pytest.raises(store.DatasetStoreError):
        dataset_tab.view_folder(root, "../elsewhere")


def test_resolution_follows_the_model_family(tiny_model, tiny_sdxl, tmp_path):
    import torch
    from safetensors.torch import save_file

    xl_file = tmp_path / "xl.safetensors"
    save_file({"conditioner.embedders.1.model.token_embedding.weight": torch.zeros(1)}, xl_file)
    assert train_tab.resolution_for(str(xl_file), 512) == 1024  # a single SDXL file: its family's size
    assert train_tab.resolution_for(str(tiny_model), 512) == 64  # the tiny demo model's own size
    assert train_tab.resolution_for(str(tiny_model), 640) is None  # a size the user chose is kept
    assert train_tab.resolution_for(str(tiny_model), 64) is None
    assert train_tab.resolution_for("", 512) is None


def test_merge_from_the_prompt_tab(settings, tiny_model, tmp_path):
    import shutil

    from core.training import train
    from tests.conftest import EventLog
    from ui.prompt_tab import merge_into_model
    from ui.settings import model_choices

    shutil.copytree(tiny_model, settings.models_dir / "tiny")
    lora = train.run(tiny_config(tiny_model, write_dataset(tmp_path / "d", n=2), tmp_path / "o", **{
        "train.max_train_steps": 2, "sample.prompts": [], "output.save_state": False}), EventLog()).lora_path
    message = merge_into_model(settings, str(settings.models_dir / "tiny"), str(lora), 0.5, "tiny merged")
    assert message.startswith("wrote") and (settings.models_dir / "tiny merged.safetensors").is_file()
    merged = str(settings.models_dir / "tiny merged.safetensors")
    assert ("tiny merged.safetensors — SD 1.x, single file", merged) in model_choices(settings.models_dir)
    base = str(settings.models_dir / "tiny")
    assert "already exists" in merge_into_model(settings, base, str(lora), 1, "tiny merged")
    assert "pick a base model" in merge_into_model(settings, "", str(lora), 1, "x")
    assert "merge failed" in merge_into_model(settings, base, str(tmp_path / "no.safetensors"), 1, "other")


def test_past_runs_say_how_each_run_stands(settings, tiny_model, tmp_path):
    from core.events import jsonl_writer
    from core.training import train

    data = write_dataset(tmp_path / "d", n=2)
    done = tiny_config(tiny_model, data, settings.outputs_dir, name="done-run",
                       **{"train.max_train_steps": 2, "sample.prompts": []})
    train.run(done, jsonl_writer(done.run_dir / "events.jsonl"))
    stopped = tiny_config(tiny_model, data, settings.outputs_dir, name="stopped-run",
                          **{"train.max_train_steps": 50, "sample.prompts": [], "output.save_every_n_steps": 0})
    write, steps = jsonl_writer(stopped.run_dir / "events.jsonl"), []

    def emit(event):
        write(event)
        if event.type == "progress":
            steps.append(event.step)

    train.run(stopped, emit, should_stop=lambda: len(steps) >= 3)
    labels = {path.split("/")[-1]: label for label, path in train_tab.run_choices(settings.outputs_dir)}
    assert labels == {"done-run": "done-run — completed, 2 steps",
                      "stopped-run": "stopped-run — stopped at step 3, resumable from step 3"}
    with pytest.raises(ConfigError, match="already completed its 2 steps"):
        RunManager(settings.outputs_dir).resume(settings.outputs_dir / "done-run")


def test_events_read_back_as_their_classes_and_a_renamed_field_is_loud(tmp_path):
    from core.events import Progress, jsonl_writer, parse, read_typed

    path = tmp_path / "events.jsonl"
    write = jsonl_writer(path)
    write(Progress(3, 10, 0, 0.5, 1e-4, 2.0, 3.5))
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"type": "progress", "stepp": 4, "total_steps": 10, "epoch": 0, "loss": 0.4, "lr": 0.0001, '
                '"it_per_s": 2.0, "eta_s": 3.0, "time": 0}\n')
    events, _ = read_typed(path)
    assert isinstance(events[0], Progress) and events[0].step == 3
    assert events[1].type == "message" and "progress event without step" in events[1].text
    with pytest.raises(ValueError, match="without step"):
        parse({"type": "progress", "stepp": 4})
    summary = summarize(tmp_path)
    assert summary.step == 3 and summary.messages[-1].startswith("warning: skipped an event")


def test_dataset_tab_handlers_are_plain_functions(settings, tmp_path):
    from core.data.caption_edits import add_trigger_word
    from ui import dataset_tab as tab

    _, created = tab.on_create(settings, "pets")
    assert "Created dataset `pets`" in created
    drop = write_dataset(tmp_path / "drop", n=2)
    files = sorted(str(p) for p in drop.iterdir())
    cleared, message, _, gallery, counts = tab.on_upload(settings, "pets", tab.TOP_LEVEL, files)
    assert cleared is None and "Added 2 image(s) and 2 caption file(s)" in message and len(gallery) == 2
    assert tab.selected_picture(settings, "pets", tab.TOP_LEVEL, 1) == ("img1.png", "a photo of sks dog number 1")
    message, counts = tab.on_save(settings, "pets", tab.TOP_LEVEL, "img1.png", "  sks on a sofa ")
    assert message == "Saved the caption of `img1.png`." and "**2** captioned" in counts
    message, _, _ = tab.bulk(settings, add_trigger_word, "pets", tab.TOP_LEVEL, "zzk")
    assert message == "Changed 2 caption(s) in this folder."
    message, gallery, _, picked, caption = tab.on_remove(settings, "pets", tab.TOP_LEVEL, "img1.png")
    assert message.startswith("Removed `img1.png`") and len(gallery) == 1 and (picked, caption) == ("", "")
    # Every failure is a message on screen, whatever the handler: no dataset, a bad folder name, no picture.
    assert tab.on_save(settings, None, tab.TOP_LEVEL, "x.png", "t")[0] == "⚠️ create or pick a dataset first"
    assert tab.on_upload(settings, "pets", "../escape", files)[1].startswith("⚠️")
    assert tab.on_remove(settings, "pets", tab.TOP_LEVEL, "")[0] == "⚠️ pick a picture in the gallery first"


def test_a_saved_preset_keeps_every_changed_setting_and_applies_back(settings, tiny_model, tmp_path):
    values = train_tab.form_defaults()
    values.update({"dataset.path": str(tmp_path), "output.name": "mine", "lora.rank": 8.0,
                   "train.lr_scheduler": "cosine", "sample.prompts": "a photo of sks\nsks at the beach",
                   "dataset.random_flip": True, "train.noise_offset": 0.05})
    raw = train_tab.preset_values(values)
    assert raw == {"lora": {"rank": 8}, "train": {"lr_scheduler": "cosine", "noise_offset": 0.05},
                   "sample": {"prompts": ["a photo of sks", "sks at the beach"]}, "dataset": {"random_flip": True}}
    message, _ = train_tab.save_preset(settings, "my style", values)
    assert message.startswith("Saved preset")
    keys = train_tab.all_fields()
    updates = dict(zip(keys, train_tab.apply_preset(settings, keys, "my style"), strict=True))
    assert updates["train.lr_scheduler"]["value"] == "cosine" and updates["lora.rank"]["value"] == 8
    assert updates["sample.prompts"]["value"] == "a photo of sks\nsks at the beach"
    assert "value" not in updates["dataset.path"] and "value" not in updates["train.optimizer"]  # left alone


def test_prompt_tab_handlers_take_the_form(tiny_model):
    from core.lora.preview import Previewer
    from ui import prompt_tab

    form = {"model": str(tiny_model), "lora": None, "scale": 1.0, "prompt": "a photo of sks", "negative": "",
            "seed": 3, "steps": 2, "guidance": 7.5, "width": 64, "height": 64, "grid_loras": [],
            "grid_scales": "0.5, 1"}
    previewer = Previewer(device="cpu")
    image, message = prompt_tab.generate(previewer, form)
    assert image.size == (64, 64) and message == "Generated with the base model at seed 3."
    assert prompt_tab.compare(previewer, form)[1] == "⚠️ pick a LoRA to compare with the base model"
    assert prompt_tab.grid(previewer, form)[1] == "⚠️ pick one or more LoRA files for the grid"
    assert prompt_tab.image_options({**form, "width": 70})["width"] == 64


def test_the_steps_line_counts_concept_folders_and_their_repeats_as_training_does(tmp_path):
    from core.data.dataset import load_split
    from core.data.manifest import set_repeats

    data = write_dataset(tmp_path / "d", n=5)
    write_dataset(data / "close ups", n=3, seed=9)
    set_repeats(data, "close ups", 3)
    text = train_tab.steps_readout({"dataset.path": str(data), "dataset.repeats": 1, "train.batch_size": 1,
                                    "train.max_train_epochs": 1, "dataset.validation_split": 0.0})
    assert "8 images (14 with folder repeats) × 1 repeats × 1 epochs / batch 1 = **14**" in text
    split = load_split(data, ".txt", 0.0, 0)  # the engine, decoding every picture, counts the same draws
    assert sum(item.repeats for item in split.train) == 14


def test_a_built_in_preset_follows_the_picked_models_family(settings, tiny_model, tiny_sdxl):
    from core.base.models import native_resolution

    keys = train_tab.all_fields()
    for model in (tiny_model, tiny_sdxl):
        updates = dict(zip(keys, train_tab.apply_preset(settings, keys, "8 GB GPU", str(model)), strict=True))
        assert updates["dataset.resolution"]["value"] == native_resolution(model)
        assert updates["lora.rank"]["value"] == 16
    updates = dict(zip(keys, train_tab.apply_preset(settings, keys, "8 GB GPU"), strict=True))
    assert updates["dataset.resolution"]["value"] == 512  # no model picked: the preset's own size


def test_the_apps_health_report_follows_the_train_tabs_settings(tiny_model, tmp_path):
    from ui import health_panel

    data = write_dataset(tmp_path / "d", n=3, size=(80, 96))
    (data / "img1.txt").write_text("a photo without the word, " + "word " * 90, encoding="utf-8")
    report, checked = health_panel.check_for_run(data, 64, str(tiny_model), "sks")
    assert report.resolution == 64 and report.summary["tokens_checked"]
    problems = {f.file: [c["check"] for c in f.checks] for f in report.files}
    assert "caption_too_long" in problems["img1.png"] and "trigger_missing" in problems["img1.png"]
    assert "small" not in problems.get("img2.png", [])  # 80x96 is above 64
    assert "64 px" in checked and "tokenizer of tiny" in checked and "'sks'" in checked
    report, checked = health_panel.check_for_run(data, 512, "owner/hub-model", "")
    assert not report.summary["tokens_checked"] and "caption length not checked" in checked
    assert "small" in [c["check"] for c in report.files[0].checks]

