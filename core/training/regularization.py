"""Regularisation (prior-preservation) pictures: class pictures trained beside the concept, and making them.

``dataset.regularization_path`` is a folder of pictures of the class the
concept belongs to ("a photo of a dog" for one particular dog), with their own
captions. They are mixed into the same batches as the training pictures, each
epoch about ``dataset.regularization_ratio`` draws of them per training draw
(integer repeats per class picture, as sd-scripts repeats them), and their loss
is weighted by ``train.prior_loss_weight``: the LoRA learns the concept without
forgetting what the class looks like. They never go to the validation set.

``make_class_pictures`` draws such a folder with the base model itself from a
class prompt (``python -m core class-pictures``), one picture per seed, each
written atomically with the prompt as its caption; pictures already there are
kept, so a stopped job continues where it was.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path

from core.config import ConfigError, TrainConfig
from core.data.dataset import ImageItem
from core.events import Emit, Message, Phase


def load_regularization(config: TrainConfig, train_items: list[ImageItem], emit: Emit) -> list[ImageItem]:
    """The class pictures, each with the repeats that give the configured share of draws (none when off)."""
    from core.data.dataset import DatasetError, require_images, scan_dataset

    d = config.dataset
    if not d.regularization_path:
        return []
    folder = Path(d.regularization_path).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"dataset.regularization_path = {d.regularization_path!r} is not a folder; point it at "
                          f"a folder of class pictures (python -m core class-pictures makes one)")
    if folder.resolve() == Path(d.path).expanduser().resolve():
        raise ConfigError("dataset.regularization_path is the training folder itself; class pictures go in a "
                          "folder of their own")
    scan = scan_dataset(folder, d.caption_extension)
    try:
        require_images(scan)
    except DatasetError as exc:
        raise ConfigError(f"dataset.regularization_path: {exc}") from None
    if scan.missing_captions:
        emit(Message("warning", f"{len(scan.missing_captions)} class picture(s) have no caption and train with an "
                                f"empty one (e.g. {scan.missing_captions[0].name}); give them the class prompt"))
    train_draws = sum(item.repeats * d.repeats for item in train_items)
    repeats = repeats_for_ratio(train_draws, len(scan.items), d.regularization_ratio)
    emit(Message("info", f"{len(scan.items)} class picture(s) from {folder}, each drawn {repeats} time(s) per epoch "
                         f"({len(scan.items) * repeats} class draws to {train_draws} training draws), loss weight "
                         f"{config.train.prior_loss_weight:g}"))
    return [dataclasses.replace(item, repeats=repeats) for item in scan.items]


def make_class_pictures(model: str, prompt: str, count: int, out: str | Path, *, negative_prompt: str = "",
                        steps: int = 0, size: int = 0, seed: int = 0, guidance_scale: float = 0.0,
                        device: str | None = None, emit: Emit = lambda event: None,
                        should_stop: Callable[[], bool] = lambda: False) -> list[Path]:
    """Write ``count`` pictures of ``prompt`` drawn by ``model`` to ``out`` (``class_NNNN.png`` with the prompt
    as ``class_NNNN.txt``), seeds ``seed``, ``seed + 1``, ...; returns the pictures (those already there kept)."""
    from core.base.models import native_resolution, sample_defaults
    from core.base.sample import generate, load_pipeline
    from core.fsutil import save_image, write_text

    if not prompt.strip():
        raise ValueError("the class prompt is empty: write what the class looks like, e.g. 'a photo of a dog'")
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pictures = [out / f"class_{i:04d}.png" for i in range(count)]
    todo = [p for p in pictures if not p.is_file()]
    emit(Phase("drawing class pictures", count - len(todo), count))
    if not todo:
        return pictures
    emit(Phase("loading model", 0, 0))
    pipe = load_pipeline(model, device=device)
    defaults = sample_defaults(model)  # the model's own steps and guidance (FLUX.1-schnell: 4 steps, none)
    side = size or native_resolution(model) or 512
    kwargs = {"steps": steps or defaults.get("steps", 25), "width": side, "height": side,
              "guidance_scale": guidance_scale if guidance_scale else defaults.get("guidance_scale", 7.5),
              "negative_prompt": negative_prompt}
    done = count - len(todo)
    for path in todo:
        if should_stop():
            emit(Message("info", f"stopped after {done} of {count} class pictures; run it again to continue"))
            break
        image = generate(pipe, prompt, seed=seed + pictures.index(path), **kwargs)
        write_text(path.with_suffix(".txt"), prompt.strip())
        save_image(path, image)  # the picture last: a picture on disk always has its caption
        done += 1
        emit(Phase("drawing class pictures", done, count))
    return [p for p in pictures if p.is_file()]


def repeats_for_ratio(train_draws: int, class_pictures: int, ratio: float) -> int:
    """Integer repeats per class picture closest to ``ratio`` class draws per training draw (at least one)."""
    return max(1, math.floor(ratio * train_draws / class_pictures + 0.5))
