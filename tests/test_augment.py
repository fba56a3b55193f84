"""Random crop and colour jitter: each draw of a picture changes before the VAE (latents not cached)."""

import numpy as np
import pytest
import torch
from conftest import EventLog, tiny_config, write_dataset
from PIL import Image

from core import config as config_mod
from core.data.buckets import fitted
from core.data.dataset import ImageItem
from core.data.images import jitter_colour
from core.training import train
from core.training.pictures import PixelAugment, pixels_loader
from core.training.train_data import Augment, Entry


def _entry(path, size, bucket):
    placement = fitted(size, bucket)
    return Entry(ImageItem(path, "a photo", None, size, 0, 1), placement, None, pixels_loader(path, placement), None)


def test_random_crops_move_the_picture_and_its_sdxl_crop_ids(tmp_path):
    gradient = np.tile(np.arange(256, dtype=np.uint8), (64, 1))  # 256 wide, 64 high: brighter to the right
    path = tmp_path / "wide.png"
    Image.fromarray(np.stack([gradient] * 3, axis=-1)).save(path)
    entry = _entry(path, (256, 64), (64, 64))
    augment = Augment(random_crop=True)
    draws = [augment(entry, seed) for seed in range(6)]
    lefts = {int(d["time_ids"][3]) for d in draws}
    assert len(lefts) > 3 and all(0 <= left <= 192 for left in lefts)  # the crop's left edge, as SDXL is told
    for d in draws:  # the pixels are the crop the ids name: the gradient's value at the crop's left edge
        left = int(d["time_ids"][3])
        assert d["pixels"][0, 0, 0].item() == pytest.approx(left / 255 * 2 - 1, abs=0.02)
    assert torch.equal(augment(entry, 3)["pixels"], augment(entry, 3)["pixels"])  # the seed decides it
    centred = Augment()(entry, 3)
    assert int(centred["time_ids"][3]) == 96  # without the option: the centre
    # A loss mask is cropped with its picture: here the picture's own brightness, as a mask file.
    import dataclasses

    from core.training.pictures import load_loss_mask, mask_loader

    Image.fromarray(gradient).save(tmp_path / "wide.mask.png")
    masked = dataclasses.replace(entry, mask=mask_loader(entry.item, entry.placement))
    draw = augment(masked, 4)
    left = int(draw["time_ids"][3])
    assert left != 96 and draw["mask"][0, 0, 0].item() == pytest.approx(left / 255, abs=0.05)
    assert torch.equal(masked.mask(False), load_loss_mask(entry.item, entry.placement))  # its own: the centre


def test_colour_jitter_changes_colour_not_shape(tmp_path):
    red = Image.new("RGB", (64, 64), (200, 40, 40))
    assert np.array_equal(np.asarray(jitter_colour(red)), np.asarray(red))
    brighter = np.asarray(jitter_colour(red, brightness=1.2), dtype=float)
    assert brighter.mean() > np.asarray(red, dtype=float).mean()
    turned = np.asarray(jitter_colour(red, hue=1 / 3), dtype=float)[0, 0]  # a third of the circle: red to green
    assert turned[1] > turned[0] and turned[1] > turned[2]
    path = tmp_path / "p.png"
    red.save(path)
    entry = _entry(path, (64, 64), (64, 64))
    augment = Augment(color_jitter=0.3, hue_jitter=0.1)
    means = {round(float(augment(entry, seed)["pixels"].mean()), 4) for seed in range(5)}
    assert len(means) == 5
    assert augment.pixel_augment(1) == augment.pixel_augment(1) and isinstance(augment.pixel_augment(1), PixelAugment)


def test_they_need_uncached_latents_and_train(tiny_sdxl, tmp_path):
    for key, value in (("dataset.random_crop", True), ("dataset.color_jitter", 0.1), ("dataset.hue_jitter", 0.02)):
        with pytest.raises(config_mod.ConfigError, match="cache_latents = false"):
            tiny_config(tiny_sdxl, tmp_path, tmp_path / "o", **{key: value})
    cfg = tiny_config(tiny_sdxl, write_dataset(tmp_path / "d", n=2, size=(96, 64)), tmp_path / "out", **{
        "dataset.cache_latents": False, "dataset.random_crop": True, "dataset.color_jitter": 0.2,
        "dataset.hue_jitter": 0.05, "dataset.buckets": False, "train.max_train_steps": 2, "sample.prompts": [],
        "output.save_state": False})
    result = train.run(cfg, EventLog())
    assert result.status == "completed"
