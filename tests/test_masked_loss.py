"""dataset.masked_loss: a picture's NAME.mask.png or transparency weights its loss at latent resolution."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from core.data.dataset import ImageItem, scan_dataset
from core.data.health import check_dataset, format_report
from core.training import loss_options, train
from core.training.pictures import load_loss_mask
from core.training.train_data import placements
from tests.conftest import EventLog, tiny_config, write_dataset


def _picture(path, size=(96, 64), alpha=None, mode="RGB"):
    rgb = (np.random.default_rng(0).random((size[1], size[0], 3)) * 255).astype("uint8")
    image = Image.fromarray(rgb)
    if alpha is not None:
        image.putalpha(Image.fromarray(alpha))
    image.save(path)
    return path


def _item(path, size):
    return ImageItem(path, "a photo", None, size, 0, 1)


def test_the_loss_is_zero_where_the_mask_is():
    target = torch.zeros(2, 4, 8, 8)
    pred = torch.zeros(2, 4, 8, 8)
    pred[..., :, 4:] = 3.0  # wrong only on the right half
    left = torch.zeros(2, 1, 64, 64)
    left[..., :, :32] = 1.0  # a pixel-size mask keeping the left half
    assert loss_options.per_example(pred, target, mask=left).tolist() == [0.0, 0.0]
    assert loss_options.per_example(pred, target).tolist() == [4.5, 4.5]
    half = torch.full((2, 1, 8, 8), 0.5)  # grey weighs half
    assert loss_options.per_example(pred, target, "l2", None, half).tolist() == [2.25, 2.25]
    patched = torch.zeros(2, 4, 4, 4)  # FLUX.2 / Z-Image predict 2x2 patches: the mask is averaged over each
    patched[..., 0, 0] = 1.0
    assert loss_options.per_example(patched, torch.zeros_like(patched), mask=left).tolist() == [1 / 16, 1 / 16]


def test_masks_come_from_the_mask_file_or_transparency(tmp_path):
    alpha = np.zeros((64, 96), dtype="uint8")
    alpha[:, :48] = 255  # the left half is the subject
    cut = _picture(tmp_path / "cut out.png", alpha=alpha)
    plain = _picture(tmp_path / "plain.png")
    mask = np.zeros((32, 48), dtype="uint8")  # a mask file at half the picture's size, keeping the top half
    mask[:16] = 255
    Image.fromarray(mask).save(tmp_path / "plain.mask.png")
    none = _picture(tmp_path / "none.jpg")
    from core import config as config_mod

    square = config_mod.with_values(config_mod.TrainConfig(), {"dataset.resolution": 64, "dataset.buckets": False})
    (place,) = placements(square, [_item(cut, (96, 64))])
    from_alpha = load_loss_mask(_item(cut, (96, 64)), place)
    assert from_alpha.shape == (1, 8, 8)
    assert from_alpha[0, :, :2].min() == 1.0 and from_alpha[0, :, -2:].max() == 0.0  # centre crop of 96x64
    from_file = load_loss_mask(_item(plain, (96, 64)), place)
    assert from_file[0, :3].min() > 0.99 and from_file[0, -3:].max() < 0.01
    assert load_loss_mask(_item(none, (96, 64)), place).min() == 1.0
    scan = scan_dataset(tmp_path)
    assert sorted(i.path.name for i in scan.items) == ["cut out.png", "none.jpg", "plain.png"]  # masks: no pictures


def test_the_health_report_lists_masks(tmp_path):
    alpha = np.zeros((64, 96), dtype="uint8")
    alpha[:, :24] = 255
    _picture(tmp_path / "a.png", alpha=alpha)
    _picture(tmp_path / "b.png")
    Image.fromarray(np.zeros((64, 96), dtype="uint8")).save(tmp_path / "b.mask.png")  # masks out everything
    _picture(tmp_path / "c.png")
    (tmp_path / "c.mask.png").write_bytes(b"not a png")
    report = check_dataset(tmp_path, resolution=64)
    masks = {m["file"]: m for m in report.to_json()["masks"]}
    assert masks["a.png"]["source"] == "alpha" and masks["a.png"]["masked"] == pytest.approx(0.75, abs=0.02)
    assert masks["b.png"] == {"file": "b.png", "source": "file", "masked": 1.0}
    checks = {f.file: {c["check"] for c in f.checks} for f in report.files}
    assert "mask_empty" in checks["b.png"] and "mask_unreadable" in checks["c.png"]
    assert report.summary["masked"] == 2 and report.summary["images"] == 3
    assert "75% masked out (from transparency)" in format_report(report)
    from ui import health_panel

    assert "2 picture(s) have a loss mask" in health_panel.summary(report) and "`a.png` 75%" in health_panel.summary(
        report)


def test_a_fully_masked_picture_trains_nothing(tiny_model, tmp_path):
    """Through the engine's own data path: with a black mask the loss is exactly 0, without it it is not."""
    from accelerate import Accelerator

    from core.training.objective import training_loss
    from core.training.train_data import build_dataloader, build_entries

    data = write_dataset(tmp_path / "d", n=2, size=(64, 64))
    for picture in data.glob("*.png"):
        Image.fromarray(np.zeros((64, 64), dtype="uint8")).save(picture.with_name(picture.stem + ".mask.png"))
    losses = {}
    for masked in (True, False):
        cfg = tiny_config(tiny_model, data, tmp_path / "o", **{"dataset.masked_loss": masked,
                                                                 "dataset.validation_split": 0.0})
        base = train.load_base(cfg, Accelerator(cpu=True), EventLog())
        from core.training.cache import FeatureCache

        items = scan_dataset(data).items
        entries = build_entries(cfg, items, base, FeatureCache(tmp_path / "cache"), EventLog(), "training")
        batch = next(iter(build_dataloader(cfg, entries)))
        assert ("mask" in batch) == masked
        losses[masked] = float(training_loss(cfg, base, base.denoiser, base.text, batch,
                                             torch.Generator().manual_seed(0), "cpu"))
    assert losses[True] == 0.0 and losses[False] > 0 and math.isfinite(losses[False])


def test_a_masked_run_completes_and_says_so(tiny_model, tmp_path):
    from safetensors import safe_open

    data = tmp_path / "d"
    data.mkdir()
    for i in range(2):
        alpha = np.zeros((64, 64), dtype="uint8")
        alpha[8:56, 8:56] = 255
        _picture(data / f"p{i}.png", size=(64, 64), alpha=alpha)
        (data / f"p{i}.txt").write_text("a photo of sks")
    cfg = tiny_config(tiny_model, data, tmp_path / "out", **{
        "dataset.masked_loss": True, "train.max_train_steps": 2, "sample.prompts": [],
        "output.save_state": False, "dataset.validation_split": 0.0, "dataset.random_flip": True})
    result = train.run(cfg, EventLog())
    assert result.status == "completed"
    with safe_open(result.lora_path, "pt") as f:
        assert f.metadata()["ss_masked_loss"] == "True"
