"""How long data preparation takes: the health report and the training scan on N pictures, and
captioning M with each tiny captioner.

    python benchmarks/bench_dataset.py --images 1000 --caption 100

Pictures are generated (random shapes on gradients, 512-1024 px, a mix of
PNG and JPEG, a few duplicates) so the figures are repeatable; the real
commands run as subprocesses, exactly as a user or the app runs them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_pictures(folder: Path, n: int, seed: int = 0) -> None:
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = int(rng.integers(512, 1025)), int(rng.integers(512, 1025))
        x = np.linspace(0, 1, w)[None, :, None]
        y = np.linspace(0, 1, h)[:, None, None]
        base = (rng.random(3) * x + rng.random(3) * y) * 200
        image = Image.fromarray(base.astype("uint8"))
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x0, y0 = int(rng.integers(0, w - 64)), int(rng.integers(0, h - 64))
            size = int(rng.integers(32, 256))
            draw.ellipse([x0, y0, x0 + size, y0 + size], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        name = f"picture {i:04d}"
        if i % 2:
            image.save(folder / f"{name}.jpg", quality=90)
        else:
            image.save(folder / f"{name}.png")
        if i % 50 == 0 and i:  # an exact duplicate now and then
            image.save(folder / f"{name} copy.png")
        (folder / f"{name}.txt").write_text(f"a photo of sks, shapes, picture {i}")


def scan_for_training(folder: Path):
    """What a training run does with the folder before loading the model: scan, split, place in buckets."""
    from core.config import TrainConfig
    from core.data.dataset import load_split
    from core.training.train_data import placements

    config = TrainConfig()
    config.dataset.path = str(folder)
    split = load_split(folder, ".txt", config.dataset.validation_split, 0)
    items = split.train + split.validation
    return items, placements(config, items)


def run(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return time.perf_counter() - started, proc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--caption", type=int, default=100)
    parser.add_argument("--captioners", default="blip,wd14,florence2", help="comma-separated captioner kinds")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        make_pictures(tmp / "data", args.images)
        print(f"generated {args.images} pictures in {time.perf_counter() - started:.1f} s")
        seconds, proc = run([sys.executable, "-m", "core", "check-dataset", str(tmp / "data"), "--json"])
        summary = json.loads(proc.stdout)["summary"]
        print(f"check-dataset on {summary['images']} pictures: {seconds:.1f} s for the whole command "
              f"({seconds / summary['images'] * 1000:.1f} ms per picture), {summary['duplicate_groups']} duplicate "
              f"groups found")
        started = time.perf_counter()
        items, places = scan_for_training(tmp / "data")
        print(f"training scan (decode, hash, split, buckets) of {len(items)} pictures: "
              f"{time.perf_counter() - started:.1f} s in {len({p.bucket for p in places})} buckets")
        make_pictures(tmp / "to-caption", args.caption, seed=1)
        for kind in args.captioners.split(","):
            run([sys.executable, "-m", "core", "tiny-captioner", str(tmp / kind), "--kind", kind])
            for txt in (tmp / "to-caption").glob("*.txt"):
                txt.unlink()
            seconds, _ = run([sys.executable, "-m", "core", "caption", str(tmp / "to-caption"), "--captioner", kind,
                              "--model", str(tmp / kind), "--events", str(tmp / f"caption-{kind}.jsonl")])
            written = len(list((tmp / "to-caption").glob("*.txt")))
            print(f"caption {written} pictures with the tiny {kind} captioner: {seconds:.1f} s for the whole "
                  f"command (including loading)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
