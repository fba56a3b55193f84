"""Training speed and memory of the real command, on a random-weight model.

    python benchmarks/bench_train.py --shape tiny --steps 100
    python benchmarks/bench_train.py --shape sd15 --steps 5 --resolution 256

Runs ``python -m core train`` as a subprocess (exactly what the app runs)
and prints: steps/s over the training steps (from the run's own progress
events, so loading and caching are not counted), the wall time of the whole
command, the peak resident memory of the training process, and where the
time from launch to the first optimizer step goes (imports, each phase,
validation and samples at step 0 with ``--at-start``) and after the last
step (saving, the final check).
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_dataset(folder: Path, n: int, size: int) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a photo of sks, picture {i}")
    return folder


def ensure_model(shape: str, model_dir: Path) -> Path:
    from core.base.tiny import write_tiny_model

    path = model_dir / f"random-{shape}"
    if not (path / "model_index.json").is_file():
        started = time.perf_counter()
        write_tiny_model(path, shape=shape)
        print(f"wrote {shape} model to {path} in {time.perf_counter() - started:.1f} s")
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["tiny", "sd15"], default="tiny")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--resolution", type=int, default=None, help="default: 64 (tiny), 256 (sd15)")
    parser.add_argument("--rank", type=int, default=None, help="default: 4 (tiny), 16 (sd15)")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--optimizer", default="adamw8bit")
    parser.add_argument("--mixed-precision", default="no")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--no-cache-latents", action="store_true",
                        help="encode every picture at every step instead of caching its latent once")
    parser.add_argument("--at-start", action="store_true",
                        help="validate (10%% of the pictures) and draw one sample before the first step")
    parser.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "lora-studio-bench")
    args = parser.parse_args()
    resolution = args.resolution or (64 if args.shape == "tiny" else 256)
    rank = args.rank or (4 if args.shape == "tiny" else 16)

    model = ensure_model(args.shape, args.model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = make_dataset(tmp / "data", args.images, resolution)
        overrides = {
            "model.path": str(model), "dataset.path": str(data), "dataset.resolution": resolution,
            "dataset.validation_split": 0.1 if args.at_start else 0.0, "lora.rank": rank, "lora.alpha": rank,
            "train.max_train_steps": args.steps, "train.optimizer": args.optimizer,
            "train.mixed_precision": args.mixed_precision,
            "train.gradient_checkpointing": args.gradient_checkpointing,
            "dataset.cache_latents": not args.no_cache_latents,
            "sample.prompts": ["a photo of sks"] if args.at_start else [], "sample.at_start": args.at_start,
            "sample.every_n_steps": 0, "sample.steps": 10,
            "output.dir": str(tmp / "out"), "output.name": "bench", "output.save_every_n_steps": 0,
            "output.save_state": False,
        }
        config_path = tmp / "bench.toml"
        config_path.write_text("")
        cmd = [sys.executable, "-m", "core", "train", str(config_path), "--no-progress"]
        for key, value in overrides.items():
            cmd += ["--set", f"{key}={_toml(value)}"]
        started, launched = time.perf_counter(), time.time()
        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                              capture_output=True, text=True)
        wall = time.perf_counter() - started
        if proc.returncode:
            print(proc.stderr[-3000:])
            return proc.returncode
        peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        report(tmp / "out" / "bench" / "events.jsonl", args, resolution, rank, wall, peak_mib)
        breakdown(tmp / "out" / "bench" / "events.jsonl", launched, launched + wall)
    return 0


def report(events_path: Path, args, resolution: int, rank: int, wall: float, peak_mib: float) -> None:
    from core.events import read_events

    events, _ = read_events(events_path)
    progress = [e for e in events if e["type"] == "progress"]
    phases = {e["name"]: e["time"] for e in events if e["type"] == "phase"}
    first, last = progress[0], progress[-1]
    # Steps after the first: the first step includes one-off warm-up (allocations, kernel selection).
    rate = (last["step"] - first["step"]) / (last["time"] - first["time"]) if len(progress) > 1 else float("nan")
    started = next(e["time"] for e in events if e["type"] == "run_started")
    print(f"shape={args.shape} resolution={resolution} rank={rank} steps={args.steps} "
          f"optimizer={args.optimizer} mixed_precision={args.mixed_precision} "
          f"gradient_checkpointing={args.gradient_checkpointing} cache_latents={not args.no_cache_latents} "
          f"threads={_threads()}")
    print(f"  training speed     {rate:8.2f} steps/s  ({1 / rate:.3f} s/step, steps 2..{last['step']})")
    print(f"  first step         {first['time'] - started:8.2f} s")
    if "loading model" in phases:
        print(f"  load+cache         {started - phases['loading model']:8.2f} s")
    print(f"  whole command      {wall:8.2f} s  (imports, loading, caching, training, saving)")
    print(f"  peak RSS           {peak_mib:8.0f} MiB  (training process)")
    print(f"  final loss         {last['loss']:.4f}")


def breakdown(events_path: Path, launched: float, ended: float) -> None:
    """Launch to first step, part by part, and what follows the last step, from the events' timestamps."""
    from core.events import read_events

    events, _ = read_events(events_path)
    # Each mark starts an interval that ends at the next mark.
    marks = [("imports and start-up", launched)]
    for event in events:
        kind = event["type"]
        if kind == "phase" and marks[-1][0] != event["name"]:
            marks.append((event["name"], event["time"]))
        elif kind == "run_started":
            marks.append(("validation at step 0", event["time"]))
        elif kind == "validation_loss" and event["step"] == 0:
            marks.append(("samples at step 0", event["time"]))
        elif kind == "sample" and event["step"] == 0:
            if marks[-1][0] == "first optimizer step":  # a later sample: step 0's samples go on
                marks[-1] = ("first optimizer step", event["time"])
            else:
                marks[-1] = ("samples at step 0", marks[-1][1])
                marks.append(("first optimizer step", event["time"]))
        elif kind == "progress":
            if marks[-1][0] != "first optimizer step":  # nothing at step 0: the interval is the first step
                marks[-1] = ("first optimizer step", marks[-1][1])
            marks.append(("", event["time"]))
            break
    last = [e for e in events if e["type"] == "progress"][-1]
    finished = next((e["time"] for e in events if e["type"] == "finished"), ended)
    print(f"  launch -> first step {marks[-1][1] - launched:6.2f} s:")
    for (name, start), (_, end) in zip(marks, marks[1:], strict=False):
        print(f"    {name:24} {end - start:6.2f} s")
    print(f"  after the last step: validation, saving and the final check {finished - last['time']:.2f} s, "
          f"exit {ended - finished:.2f} s")


def _toml(value) -> str:
    import tomli_w

    return tomli_w.dumps({"v": value})[4:].strip()


def _threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    sys.exit(main())
