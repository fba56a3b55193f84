"""Peak memory of reading one giant picture: the training scan, the health report and one training example,
each in a fresh process, for a JPEG and a PNG of the same size, decoded in full and the way the engine does.

    python benchmarks/bench_big_picture.py --side 12000      # 144 megapixels

"full" is ``load_image(path)`` (every pixel decoded, as the engine did before pictures over 40 megapixels
were decoded reduced); the other rows are the engine's own code paths. Linux only (peak = VmHWM).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CASES = {
    "full decode": "from core.data.images import load_image\nload_image(PATH).close()",
    "training scan": "from core.data.dataset import scan_dataset\nscan_dataset(FOLDER)",
    "health report": "from core.data.health import check_dataset\ncheck_dataset(FOLDER, resolution=1024)",
    "training example (1024 px bucket)": (
        "from core.data.buckets import Placement\nfrom core.training.train_data import _load_pixels\n"
        "_load_pixels(Path(PATH), Placement((SIDE, SIDE), (1024, 1024), (1024, 1024), (0, 0)), False)"),
}


def measure(code: str, folder: Path, path: Path, side: int) -> tuple[float, float]:
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        sys.path.insert(0, {str(ROOT)!r})
        FOLDER, PATH, SIDE = {str(folder)!r}, {str(path)!r}, {side}
        start = time.perf_counter()
    """) + code + textwrap.dedent("""
        seconds = time.perf_counter() - start
        peak = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
        print(int(peak.split()[1]) / 1024, seconds)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    mb, seconds = out.stdout.split()
    return float(mb), float(seconds)


def baseline() -> float:
    """Peak of a process that imports the same modules and reads nothing."""
    script = (f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
              "import core.data.dataset, core.data.health, core.training.train_data\n"
              "print(int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) / 1024)")
    return float(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                check=True).stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=12_000, help="square picture side (default 12000: 144 MP)")
    args = parser.parse_args()
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        print(f"picture: {args.side} x {args.side} ({args.side ** 2 / 1e6:.0f} megapixels); "
              f"a process importing the same modules peaks at {baseline():.0f} MB")
        for fmt in ("jpg", "png"):
            folder = Path(tmp) / fmt
            folder.mkdir()
            path = folder / f"huge.{fmt}"
            started = time.perf_counter()
            Image.linear_gradient("L").resize((args.side, args.side)).convert("RGB").save(path)
            print(f"\n{fmt.upper()} ({path.stat().st_size / 1e6:.1f} MB file, made in "
                  f"{time.perf_counter() - started:.1f} s)")
            for name, code in CASES.items():
                mb, seconds = measure(code, folder, path, args.side)
                print(f"  {name:36s} peak {mb:7.0f} MB  {seconds:6.2f} s")


if __name__ == "__main__":
    main()
