"""How the app's server answers while a run trains: pictures dropped in and other calls made at once.

    python benchmarks/bench_server.py --pictures 300 --calls 50

Starts the real app (``python launch.py``) on a fresh home and a training run on the tiny model beside it,
then drives the same load as tests/test_server_load.py: the pictures in three drops (ten files an upload
request, then the Dataset tab's import) and CALLS other handlers at once (gallery listing, the Train tab's
poll, the Prompt tab's lists). Prints latency percentiles per kind and whether everything arrived.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pictures", type=int, default=300)
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from core import config as config_mod
    from core.base.tiny import write_tiny_model
    from core.events import read_events
    from tests.app_server import drive_load, request, running_app
    from tests.conftest import tiny_config, write_dataset

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        home = tmp / "home"
        (home / "datasets" / "busy").mkdir(parents=True)
        pictures = []
        for i in range(-(-args.pictures // 10)):
            folder = write_dataset(tmp / "drop" / f"{i:03d}", n=10, size=(48, 40), captions=False, seed=i)
            for j, path in enumerate(sorted(folder.glob("*.png"))):
                pictures.append(path.rename(tmp / "drop" / f"p{i:03d}-{j}.png"))
        pictures = pictures[: args.pictures]
        model = write_tiny_model(tmp / "tiny")
        cfg = tiny_config(model, write_dataset(tmp / "train", n=3), home / "outputs", name="busy-run",
                          **{"train.max_train_steps": 100000, "output.save_every_n_steps": 0, "sample.prompts": []})
        config_mod.save(cfg, tmp / "run.toml")
        trainer = subprocess.Popen([sys.executable, "-m", "core", "train", str(tmp / "run.toml"), "--no-progress"],
                                   cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            with running_app(home) as app:
                while not any(e["type"] == "progress" for e in read_events(cfg.run_dir / "events.jsonl")[0]):
                    time.sleep(0.3)
                fn = {d["api_name"]: d["id"] for d in json.loads(request(app["port"], "GET", "/config")[1])
                      ["dependencies"]}
                started = time.perf_counter()
                results = drive_load(app["port"], fn, "busy", pictures, calls=args.calls)
                wall = time.perf_counter() - started
                steps = max(e["step"] for e in read_events(cfg.run_dir / "events.jsonl")[0]
                            if e["type"] == "progress")
        finally:
            trainer.send_signal(signal.SIGTERM)
            trainer.wait(timeout=120)
        stored = len(list((home / "datasets" / "busy").glob("*.png")))
    print(f"{args.pictures} pictures in 3 drops + {args.calls} calls, all at once, while training "
          f"(the run was at step {steps}): {wall:.1f} s in all")
    print(f"{'kind':12s} {'n':>4s} {'ok':>4s} {'p50 s':>7s} {'p90 s':>7s} {'p99 s':>7s} {'max s':>7s} {'mean s':>7s}")
    for kind, rows in sorted(results.items()):
        seconds = [s for s, _ in rows]
        print(f"{kind:12s} {len(rows):4d} {sum(ok for _, ok in rows):4d} {percentile(seconds, 0.5):7.2f} "
              f"{percentile(seconds, 0.9):7.2f} {percentile(seconds, 0.99):7.2f} {max(seconds):7.2f} "
              f"{statistics.mean(seconds):7.2f}")
    print(f"pictures in the dataset afterwards: {stored} of {args.pictures}")


if __name__ == "__main__":
    main()
