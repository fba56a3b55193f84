import os

# Tests never reach the network: no hub downloads, no analytics.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from pathlib import Path

import pytest


def _tiny(tmp_path_factory, name: str, family: str) -> Path:
    """A tiny random-weight diffusers folder of ``family`` (core.base.tiny), built once per session."""
    from core.base.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / name, family=family)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random-weight SD-1.x diffusers folder, built once per session."""
    return _tiny(tmp_path_factory, "tiny", "sd15")


@pytest.fixture(scope="session")
def tiny_sd2(tmp_path_factory) -> Path:
    """A tiny SD-2.x-style model (linear projections, v-prediction)."""
    return _tiny(tmp_path_factory, "tiny-sd2", "sd2")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    """A tiny SDXL model (two text encoders, text_time UNet)."""
    return _tiny(tmp_path_factory, "tiny-sdxl", "sdxl")


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory) -> Path:
    """A tiny SD 3.5 (Medium's MMDiT-X layout: CLIP-L, CLIP-G and T5 encoders, flow matching)."""
    return _tiny(tmp_path_factory, "tiny-sd3", "sd3")


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory) -> Path:
    """A tiny FLUX.1-dev (double and single blocks, guidance embedding, CLIP-L and T5)."""
    return _tiny(tmp_path_factory, "tiny-flux", "flux")


@pytest.fixture(scope="session")
def tiny_zimage(tmp_path_factory) -> Path:
    """A tiny Z-Image (Turbo's layout: single-stream DiT with refiners, Qwen3 encoder, FLUX.1's VAE)."""
    return _tiny(tmp_path_factory, "tiny-zimage", "zimage")


@pytest.fixture(scope="session")
def tiny_flux2(tmp_path_factory) -> Path:
    """A tiny FLUX.2 [klein] base (Qwen3 encoder, 32-channel VAE with batch-norm statistics)."""
    return _tiny(tmp_path_factory, "tiny-flux2", "flux2")


def write_dataset(folder: Path, n: int = 6, size=(80, 96), captions: bool = True, seed: int = 0) -> Path:
    """n random-colour images (plus captions) with a few odd names."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        name = f"img {i} ça" if i % 3 == 0 else f"img{i}"
        pixels = (rng.random((*size, 3)) * 255).astype("uint8")
        Image.fromarray(pixels).save(folder / f"{name}.png")
        if captions:
            (folder / f"{name}.txt").write_text(f"a photo of sks dog number {i}", encoding="utf-8")
    return folder


@pytest.fixture
def ds(tmp_path) -> Path:
    """An empty app-owned dataset (core.data.dataset_store)."""
    from core.data import dataset_store

    return dataset_store.create_dataset(tmp_path / "datasets", "my dog")


@pytest.fixture
def dataset(tmp_path) -> Path:
    return write_dataset(tmp_path / "pictures")


def cli(*args) -> int:
    """``python -m core ARGS`` in this process (for refusals: the same code without another interpreter
    start); the exit code, argparse's own refusals included."""
    from core.cli import main

    try:
        return main([str(a) for a in args])
    except SystemExit as exc:
        return int(exc.code)


def stop_then_resume(cfg, step: int = 2):
    """Train ``cfg`` until a STOP file ends it after ``step``, then resume it to the end: (stopped, resumed)."""
    from core.training import train
    from core.training.run_folder import RunPaths

    def touch_stop(event):
        if event.type == "progress" and event.step == step:
            RunPaths.of(cfg).stop.touch()

    return train.run(cfg, EventLog(touch_stop)), train.run(cfg, EventLog(), resume=True)


def tiny_config(model: Path, dataset: Path, out: Path, name: str = "test-lora", **overrides):
    """A config for a fast run on the tiny model; overrides are {"section.key": value}."""
    from core import config

    raw = {
        "model": {"path": str(model)},
        "dataset": {"path": str(dataset), "resolution": 64},
        "lora": {"rank": 4, "alpha": 8.0},
        "train": {"max_train_steps": 6, "learning_rate": 1e-3, "optimizer": "adamw8bit",
                  "gradient_checkpointing": False},
        "sample": {"prompts": ["a photo of sks"], "every_n_steps": 3, "steps": 2},
        "output": {"dir": str(out), "name": name, "save_every_n_steps": 3},
    }
    for key, value in overrides.items():
        section, name_ = key.split(".")
        raw.setdefault(section, {})[name_] = value
    return config.from_dict(raw)


class EventLog:
    """An ``emit`` that keeps events in memory (and can act on them)."""

    def __init__(self, on_event=None):
        self.events = []
        self.on_event = on_event

    def __call__(self, event):
        self.events.append(event)
        if self.on_event:
            self.on_event(event)

    def of(self, kind: str):
        return [e for e in self.events if e.type == kind]


def sigterm_once(proc, events_path, ready, timeout: float = 300, poll: float = 0.1):
    """Wait until the events file shows ``ready(events)``, send SIGTERM, and return (stderr, final events)."""
    import signal
    import time

    from core.events import read_events

    deadline = time.time() + timeout
    while time.time() < deadline:
        events, _ = read_events(events_path)
        if ready(events):
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(poll)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return err, read_events(events_path)[0]
