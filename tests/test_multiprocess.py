"""The same train command under `accelerate launch` runs data-parallel on several processes."""

import json
import os
import shutil
import subprocess
from pathlib import Path

from core import config
from core.events import read_events
from tests.conftest import tiny_config, write_dataset

ROOT = Path(__file__).resolve().parents[1]


def test_two_process_accelerate_launch_on_cpu(tmp_path, tiny_model):
    accelerate = shutil.which("accelerate")
    assert accelerate, "accelerate's launcher is installed with requirements.txt"
    data = write_dataset(tmp_path / "d", n=6)
    write_dataset(data / "wide", n=3, size=(40, 120), seed=1)  # (height, width): another bucket
    # buckets of several sizes, flips and shuffled captions: every process must draw the same batches
    cfg = tiny_config(tiny_model, data, tmp_path / "o", name="ddp",
                      **{"train.max_train_steps": 4, "sample.every_n_steps": 2, "output.save_every_n_steps": 2,
                         "dataset.bucket_step": 16, "dataset.random_flip": True, "dataset.shuffle_captions": True,
                         "train.batch_size": 2})
    path = tmp_path / "run.toml"
    config.save(cfg, path)
    # The users' multi-GPU command, on CPUs (the engine picks gloo when there is no CUDA).
    # One thread per process: two processes on two cores must not oversubscribe.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "core", "train", str(path),
                          "--no-progress"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    events, _ = read_events(cfg.run_dir / "events.jsonl")
    started = [e for e in events if e["type"] == "run_started"]
    assert len(started) == 1 and started[0]["num_processes"] == 2  # only the main process writes events
    assert [e["step"] for e in events if e["type"] == "progress"] == [1, 2, 3, 4]
    assert events[-1]["type"] == "finished" and events[-1]["status"] == "completed"
    assert (cfg.run_dir / "ddp.safetensors").is_file()
    buckets = json.loads((cfg.run_dir / "buckets.json").read_text(encoding="utf-8"))["buckets"]
    assert len(buckets) == 2
    assert (cfg.run_dir / "state" / "step-00000004" / "lora_unet.safetensors").is_file()
