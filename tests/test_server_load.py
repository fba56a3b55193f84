"""While a run trains, the app's pages stay responsive: 300 pictures dropped in three drops and 50 other
calls at once, through the real server on loopback. Every call answers and every picture arrives exactly
once. (The latencies are printed by benchmarks/bench_server.py, not asserted here.)"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from core import config as config_mod
from core.events import read_events
from tests.app_server import ROOT, drive_load, request, running_app
from tests.conftest import tiny_config, write_dataset


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow  # a load test (a run, 300 uploads and 50 calls at once): about 13 s
def test_300_pictures_and_50_calls_while_a_run_trains(tiny_model, tmp_path):
    home = tmp_path / "home"
    (home / "datasets" / "busy").mkdir(parents=True)
    pictures = []
    for i in range(30):  # 300 distinct small pictures
        folder = write_dataset(tmp_path / "drop" / f"{i:02d}", n=10, size=(48, 40), captions=False, seed=i)
        for j, path in enumerate(sorted(folder.glob("*.png"))):
            pictures.append(path.rename(tmp_path / "drop" / f"p{i:02d}-{j}.png"))
    cfg = tiny_config(tiny_model, write_dataset(tmp_path / "train", n=3), home / "outputs", name="busy-run",
                      **{"train.max_train_steps": 100000, "output.save_every_n_steps": 0, "sample.prompts": []})
    config_mod.save(cfg, tmp_path / "run.toml")
    trainer = subprocess.Popen([sys.executable, "-m", "core", "train", str(tmp_path / "run.toml"), "--no-progress"],
                               cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        with running_app(home) as app:
            port = app["port"]
            deadline = time.time() + 300
            while not any(e["type"] == "progress" for e in read_events(cfg.run_dir / "events.jsonl")[0]):
                assert trainer.poll() is None and time.time() < deadline
                time.sleep(0.3)
            config = json.loads(request(port, "GET", "/config")[1])
            fn = {d["api_name"]: d["id"] for d in config["dependencies"]}
            results = drive_load(port, fn, "busy", pictures, calls=50)
            assert trainer.poll() is None  # it trained all along
    finally:
        trainer.send_signal(signal.SIGTERM)
        trainer.wait(timeout=120)
    assert len(results["drop"]) == 3 and all(ok for _, ok in results["drop"])
    answered = [ok for kind, rows in results.items() if kind != "drop" for _, ok in rows]
    assert len(answered) == 50 and all(answered)
    stored = sorted((home / "datasets" / "busy").glob("*.png"))
    assert len(stored) == 300
    assert sorted(_digest(p) for p in stored) == sorted(_digest(p) for p in pictures)
    assert sorted(p.name for p in stored) == sorted(p.name for p in pictures)
