"""TensorBoard logging (``output.tensorboard``) through accelerate's tracker: the run's numbers and samples.

accelerate writes the event files (``RUN/tensorboard/NAME``); the loop logs the
training loss and learning rate each step, the validation losses (the moving
average's too) and each sample image at its step. The app's own plots read the
run's events file as before; this is for people who compare runs in TensorBoard.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from core.config import ConfigError, TrainConfig
from core.events import Emit, Message

FOLDER = "tensorboard"


def tracker_arguments(config: TrainConfig) -> dict:
    from accelerate.utils import ProjectConfiguration, is_tensorboard_available

    if not is_tensorboard_available():
        raise ConfigError("output.tensorboard = true needs the tensorboard package: pip install tensorboard "
                          "(into the app's environment), or set it to false")
    return {"log_with": "tensorboard",
            "project_config": ProjectConfiguration(project_dir=str(config.run_dir),
                                                   logging_dir=str(Path(config.run_dir) / FOLDER))}


def start_tensorboard(config: TrainConfig, accelerator, emit: Emit) -> None:
    accelerator.init_trackers(config.output.name, config=hyperparameters(config))
    if accelerator.is_main_process:
        folder = Path(config.run_dir) / FOLDER
        emit(Message("info", f'TensorBoard logs in {folder}; open them with: tensorboard --logdir "{folder}"'))


def hyperparameters(config: TrainConfig) -> dict:
    """The settings as TensorBoard's hyperparameter table takes them (numbers, text, booleans; lists as text)."""
    import dataclasses

    flat = {}
    for section in dataclasses.fields(config):
        value = getattr(config, section.name)
        if not dataclasses.is_dataclass(value):
            continue
        for field in dataclasses.fields(value):
            item = getattr(value, field.name)
            flat[f"{section.name}.{field.name}"] = item if isinstance(item, (int, float, str, bool)) else str(item)
    return flat


def log_image(accelerator, tag: str, image, step: int) -> None:
    """A sample picture (PIL) in TensorBoard's image tab."""
    tracker = accelerator.get_tracker("tensorboard", unwrap=True)
    tracker.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")
