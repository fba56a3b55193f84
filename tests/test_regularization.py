"""Regularisation (class) pictures: mixed into the batches at the set ratio, weighted, and drawn by the model."""

import json
import math

import pytest
import torch
from conftest import EventLog, tiny_config, write_dataset
from safetensors import safe_open

from core import config as config_mod
from core.data.dataset import scan_dataset
from core.training import train
from core.training.regularization import load_regularization, make_class_pictures, repeats_for_ratio


def test_repeats_give_the_ratio():
    assert repeats_for_ratio(40, 10, 1.0) == 4
    assert repeats_for_ratio(40, 10, 0.5) == 2
    assert repeats_for_ratio(5, 100, 1.0) == 1  # never less than once
    assert repeats_for_ratio(30, 20, 1.0) == 2  # 1.5 rounds up


@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_class_pictures_appear_in_batches_at_the_ratio_with_their_weight(tiny_model, tmp_path, ratio):
    from accelerate import Accelerator

    from core.training.cache import FeatureCache
    from core.training.train_data import build_dataloader, build_entries

    data = write_dataset(tmp_path / "d", n=4, size=(64, 64))
    classes = write_dataset(tmp_path / "c", n=2, size=(64, 64), seed=5)
    cfg = tiny_config(tiny_model, data, tmp_path / "o", **{
        "dataset.regularization_path": str(classes), "dataset.regularization_ratio": ratio,
        "train.prior_loss_weight": 0.25, "dataset.validation_split": 0.0, "train.batch_size": 2})
    train_items = scan_dataset(data).items
    class_items = load_regularization(cfg, train_items, EventLog())
    assert [item.repeats for item in class_items] == [round(ratio * 4 / 2)] * 2
    base = train.load_base(cfg, Accelerator(cpu=True), EventLog())
    cache = FeatureCache(tmp_path / "cache")
    entries = build_entries(cfg, train_items, base, cache, EventLog(), "training")
    class_entries = build_entries(cfg, class_items, base, cache, EventLog(), "class picture")
    for entry in class_entries:
        entry.weight = cfg.train.prior_loss_weight
    loader = build_dataloader(cfg, entries + class_entries)
    drawn = {"train": 0, "class": 0}
    for batch in loader:
        for path, weight in zip(batch["path"], batch["weight"].tolist(), strict=True):
            kind = "class" if str(classes) in path else "train"
            drawn[kind] += 1
            assert weight == (0.25 if kind == "class" else 1.0)
    assert drawn == {"train": 4, "class": 4 * ratio}


def test_the_loss_is_weighted_per_example():
    from core.training.objective import _weighted_mean

    losses = torch.tensor([2.0, 4.0])
    assert _weighted_mean(losses, {"weight": torch.tensor([1.0, 0.5])}).item() == 2.0
    assert _weighted_mean(losses, {}).item() == 3.0


def test_drawing_class_pictures_and_training_with_them(tiny_model, tmp_path, capsys):
    from core.cli import main

    out = tmp_path / "classes"
    events = tmp_path / "events.jsonl"
    assert main(["class-pictures", "--model", str(tiny_model), "--prompt", "a photo of a dog", "--count", "3",
                 "--out", str(out), "--steps", "2", "--size", "64", "--events", str(events)]) == 0
    pictures = sorted(out.glob("class_*.png"))
    assert len(pictures) == 3 and all(p.with_suffix(".txt").read_text() == "a photo of a dog" for p in pictures)
    phases = [json.loads(line) for line in events.read_text().splitlines()]
    assert phases[-1]["done"] == phases[-1]["total"] == 3
    stamp = pictures[0].stat().st_mtime_ns
    assert len(make_class_pictures(str(tiny_model), "a photo of a dog", 4, out, steps=2, size=64)) == 4
    assert pictures[0].stat().st_mtime_ns == stamp  # kept: the job continues where it was
    assert main(["class-pictures", "--model", str(tiny_model), "--prompt", " ", "--out", str(out)]) == 2
    assert "class prompt is empty" in capsys.readouterr().err

    data = write_dataset(tmp_path / "d", n=2)
    cfg = tiny_config(tiny_model, data, tmp_path / "run", **{
        "dataset.regularization_path": str(out), "train.max_train_steps": 2, "sample.prompts": [],
        "output.save_state": False})
    log = EventLog()
    result = train.run(cfg, log)
    assert result.status == "completed" and all(math.isfinite(e.loss) for e in log.of("progress"))
    with safe_open(result.lora_path, "pt") as f:
        meta = f.metadata()
    assert meta["ss_num_reg_images"] == "4" and meta["ss_prior_loss_weight"] == "1.0"
    assert any("class picture(s)" in e.text for e in log.of("message"))


def test_bad_regularization_folders_are_refused(tiny_model, tmp_path):
    data = write_dataset(tmp_path / "d", n=2)
    for path, message in ((tmp_path / "nope", "is not a folder"), (data, "training folder itself")):
        cfg = tiny_config(tiny_model, data, tmp_path / "o", **{"dataset.regularization_path": str(path)})
        with pytest.raises(config_mod.ConfigError, match=message):
            load_regularization(cfg, scan_dataset(data).items, EventLog())


def test_the_dataset_tabs_class_box_draws_into_a_dataset_of_its_own(tiny_model, tmp_path):
    from ui.class_pictures import ClassJobs
    from ui.settings import AppSettings

    settings = AppSettings(tmp_path / "home")
    settings.ensure()
    jobs = ClassJobs(settings)
    assert "pick the dataset" in jobs.start("", str(tiny_model), "a photo of a dog", 2)[0]
    assert "class prompt" in jobs.start("dogs", str(tiny_model), " ", 2)[0]
    message, _ = jobs.start("dogs", str(tiny_model), "a photo of a dog", 1, 2)
    assert message == "Loading the model…"
    jobs.job.process.wait(timeout=300)
    text, _ = jobs.tick()
    folder = settings.datasets_dir / "dogs class"
    assert f"1 class pictures in `{folder}`" in text, jobs.job.log_tail()
    assert sorted(p.name for p in folder.glob("*.png")) == ["class_0000.png"]
    assert (folder / "class_0000.txt").read_text() == "a photo of a dog"
