"""The command line contract: python -m core tiny-model / train / sample, as a user (or the app) runs it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core import config
from core.events import read_events
from tests.conftest import sigterm_once, tiny_config, write_dataset

ROOT = Path(__file__).resolve().parents[1]


def core_cmd(*args, timeout=600, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "core", *map(str, args)], cwd=kwargs.pop("cwd", ROOT), env=env,
                          capture_output=True, text=True, timeout=timeout, **kwargs)


def test_tiny_model_command_writes_a_loadable_pipeline(tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    out = core_cmd("tiny-model", tmp_path / "tiny")
    assert out.returncode == 0, out.stderr
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "tiny")
    image = pipe("a photo of sks", num_inference_steps=2, height=64, width=64, output_type="np").images[0]
    assert image.shape == (64, 64, 3)
    from tests.conftest import cli

    assert cli("tiny-model", tmp_path / "tiny") == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("family, pipeline", [("sd2", "StableDiffusionPipeline"),
                                              ("sdxl", "StableDiffusionXLPipeline")])
def test_tiny_model_of_each_family(tmp_path, family, pipeline, capsys):
    """In this process (the command's own process start is tested with SD 1.x above)."""
    import diffusers

    from core.base.families import detect_family
    from tests.conftest import cli

    assert cli("tiny-model", tmp_path / family, "--family", family) == 0, capsys.readouterr().err
    assert detect_family(tmp_path / family).name == family
    pipe = getattr(diffusers, pipeline).from_pretrained(tmp_path / family)
    assert pipe("a photo of sks", num_inference_steps=2, height=64, width=64, output_type="np").images[0].shape == \
        (64, 64, 3)
    assert cli("tiny-model", tmp_path / "big", "--family", family, "--shape", "sd15") == 2
    assert "only for sd15" in capsys.readouterr().err


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("cli")
    data = write_dataset(root / "my pictures", n=4)
    cfg = tiny_config(tiny_model, data, root / "outputs", name="cli-lora")
    path = root / "run.toml"
    config.save(cfg, path)
    out = core_cmd("train", path, "--set", "train.max_train_steps=4", "--set", "sample.every_n_steps=2")
    return cfg, out


def test_train_command_trains_and_reports(cli_run):
    cfg, out = cli_run
    assert out.returncode == 0, out.stderr
    assert "completed at step 4" in out.stderr
    assert "4/4" in out.stderr  # the progress bar reached the end
    events, _ = read_events(cfg.run_dir / "events.jsonl")
    finished = [e for e in events if e["type"] == "finished"]
    assert len(finished) == 1 and finished[0]["step"] == 4
    assert [e["step"] for e in events if e["type"] == "validation_loss"] == [0, 2, 4]
    # every export is checked against the base model; the final file also through diffusers and an image
    checks = [e for e in events if e["type"] == "lora_verified"]
    assert [c["step"] for c in checks] == [3, 4, -1] and all(c["ok"] for c in checks)
    assert checks[-1]["loads"] is True and checks[-1]["mean_change"] > 0
    assert checks[0]["matched"] == checks[0]["modules"] > 0
    assert "modules map onto the base model" in out.stderr
    assert (cfg.run_dir / "cli-lora.safetensors").is_file()
    saved = config.load(cfg.run_dir / "config.toml")
    assert saved.train.max_train_steps == 4  # --set overrides are part of the resolved config


def test_sample_command_with_and_without_lora(cli_run, tiny_model, tmp_path, capsys):
    from core.cli import main

    cfg, _ = cli_run
    common = ["--model", tiny_model, "--prompt", "a photo of sks", "--seed", 3, "--steps", 2, "--width", 64,
              "--height", 64]
    lora = core_cmd("sample", *common, "--lora", cfg.run_dir / "cli-lora.safetensors", "--scale", 1.0,
                    "--out", tmp_path / "lora.png")
    assert lora.returncode == 0, lora.stderr
    # the base picture and a refusal in this process (the same code, without a second start-up)
    assert main(["sample", *map(str, common), "--out", str(tmp_path / "base.png")]) == 0
    a = np.asarray(Image.open(tmp_path / "base.png"), dtype=np.int16)
    b = np.asarray(Image.open(tmp_path / "lora.png"), dtype=np.int16)
    assert a.shape == (64, 64, 3) and np.abs(a - b).max() > 0
    capsys.readouterr()
    missing = main(["sample", *map(str, common), "--lora", str(tmp_path / "nope.safetensors"), "--out",
                    str(tmp_path / "x.png")])
    assert missing == 2 and "does not exist" in capsys.readouterr().err


def test_bad_config_fails_with_one_clear_line(tmp_path, tiny_model):
    data = write_dataset(tmp_path / "d", n=2)
    path = tmp_path / "run.toml"
    config.save(tiny_config(tiny_model, data, tmp_path / "o"), path)
    out = core_cmd("train", path, "--set", "lora.rank=0")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines == ["error: config: lora.rank = 0 is out of range; allowed: 1 to 1024"]


def test_dataset_without_images_fails_before_loading_the_model(tmp_path, tiny_model):
    data = tmp_path / "empty"
    data.mkdir()
    (data / "photo.jpg").write_bytes(b"")
    path = tmp_path / "run.toml"
    cfg = tiny_config(tiny_model, data, tmp_path / "o")
    config.save(cfg, path)
    out = core_cmd("train", path)
    assert out.returncode == 2
    assert "error: dataset: no readable image" in out.stderr and "photo.jpg (file is empty" in out.stderr
    events, _ = read_events(cfg.run_dir / "events.jsonl")
    assert events[-1]["type"] == "error" and events[-1]["kind"] == "dataset"
    assert not any(e["type"] == "phase" and e["name"] == "loading model" for e in events)


def test_sigterm_stops_after_the_current_step_and_saves(tmp_path, tiny_model):
    data = write_dataset(tmp_path / "d", n=3)
    cfg = tiny_config(tiny_model, data, tmp_path / "o", name="sig",
                      **{"train.max_train_steps": 100000, "sample.prompts": [], "output.save_every_n_steps": 0})
    path = tmp_path / "run.toml"
    config.save(cfg, path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "core", "train", str(path), "--no-progress"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    events_path = cfg.run_dir / "events.jsonl"
    _, events = sigterm_once(proc, events_path,
                             lambda events: any(e["type"] == "progress" and e["step"] >= 2 for e in events), poll=0.2)
    finished = events[-1]
    assert finished["type"] == "finished" and finished["status"] == "stopped"
    last_progress = max(e["step"] for e in events if e["type"] == "progress")
    assert finished["step"] == last_progress
    assert (cfg.run_dir / "sig.safetensors").is_file()
    assert (cfg.run_dir / "state" / f"step-{finished['step']:08d}").is_dir()
    assert json.loads(events_path.read_text().splitlines()[-1])["status"] == "stopped"
