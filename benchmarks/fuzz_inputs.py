"""Malformed pictures and captions against everything that reads a dataset: how many, and did anything crash?

    python benchmarks/fuzz_inputs.py --files 2000

Seeds are valid pictures of many kinds (PNG RGB/RGBA/16-bit/palette with transparency, JPEG, progressive
JPEG, CMYK JPEG, GIF, WebP, TIFF, BMP); each malformed file is a seed truncated, with bytes flipped in its
header or body, with junk inserted, with its PNG size fields rewritten (CRC fixed, so decoders believe
it), or pure junk, under a picture extension. Captions get invalid UTF-8, NUL bytes and megabytes of text.
All of them go through the training scan, the health report and the Dataset tab's import, in one folder,
with a fixed seed. A crash is any exception other than the reported "cannot be used" reasons.
"""

from __future__ import annotations

import argparse
import io
import random
import struct
import sys
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def seeds() -> dict[str, bytes]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    rgb = Image.fromarray((rng.random((72, 88, 3)) * 255).astype("uint8"))
    out = {}

    def save(name: str, image, **kw) -> None:
        buffer = io.BytesIO()
        image.save(buffer, **kw)
        out[name] = buffer.getvalue()

    save("rgb.png", rgb, format="PNG")
    save("rgba.png", rgb.convert("RGBA"), format="PNG")
    save("deep.png", Image.fromarray((rng.random((40, 50)) * 65535).astype("uint16")), format="PNG")
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    save("palette.png", palette, format="PNG", transparency=0)
    save("photo.jpg", rgb, format="JPEG", quality=85)
    save("progressive.jpg", rgb, format="JPEG", progressive=True)
    save("cmyk.jpg", rgb.convert("CMYK"), format="JPEG")
    save("anim.gif", palette, format="GIF")
    save("photo.webp", rgb, format="WEBP")
    save("scan.tiff", rgb, format="TIFF")
    save("old.bmp", rgb, format="BMP")
    return out


def png_with_size(data: bytes, width: int, height: int) -> bytes:
    data = bytearray(data)
    at = data.index(b"IHDR")
    data[at + 4: at + 12] = struct.pack(">II", width, height)
    data[at + 17: at + 21] = struct.pack(">I", zlib.crc32(bytes(data[at: at + 17])))
    return bytes(data)


def mutate(rng: random.Random, name: str, data: bytes) -> tuple[str, bytes]:
    kind = rng.choice(["truncate", "flip-header", "flip-body", "insert", "size", "junk", "empty"])
    if kind == "truncate":
        return kind, data[: rng.randrange(0, len(data))]
    if kind in ("flip-header", "flip-body"):
        out = bytearray(data)
        lo, hi = (0, min(len(out), 128)) if kind == "flip-header" else (0, len(out))
        for _ in range(rng.randint(1, 24)):
            out[rng.randrange(lo, hi)] = rng.randrange(256)
        return kind, bytes(out)
    if kind == "insert":
        at = rng.randrange(len(data))
        return kind, data[:at] + rng.randbytes(rng.randint(1, 512)) + data[at:]
    if kind == "size" and name.endswith(".png"):
        sizes = [0, 1, 65535, 2 ** 31 - 1, 100_000, 14_200]
        return kind, png_with_size(data, rng.choice(sizes), rng.choice(sizes))
    if kind == "empty":
        return kind, b""
    return "junk", rng.randbytes(rng.randint(1, 4096))


def caption(rng: random.Random) -> bytes:
    return rng.choice([
        b"a photo of sks",
        b"\xff\xfe\x00bad utf-8 \x80\x81",
        b"nul \x00 in the middle",
        ("tag, " * 300_000).encode(),  # 1.5 MB
        rng.randbytes(200),
        "\ufeffbom and ünïcode".encode("utf-8"),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import warnings

    from core.data import dataset_store
    from core.data.dataset import scan_dataset
    from core.data.health import check_dataset

    warnings.simplefilter("ignore")  # Pillow's own notes on the broken files ("Truncated File Read", ...)
    rng = random.Random(args.seed)
    base = seeds()
    kinds: Counter = Counter()
    crashes: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "fuzz"
        folder.mkdir()
        sources = []
        for i in range(args.files):
            name = rng.choice(list(base))
            kind, data = mutate(rng, name, base[name])
            kinds[kind] += 1
            path = folder / f"{i:05d}-{kind}-{name}"
            path.write_bytes(data)
            sources.append(path)
            if rng.random() < 0.2:
                path.with_suffix(".txt").write_bytes(caption(rng))
                sources.append(path.with_suffix(".txt"))
        started = time.perf_counter()
        outcome = {}
        for what, job in [("training scan", lambda: scan_dataset(folder)),
                          ("health report", lambda: check_dataset(folder, resolution=64)),
                          ("Dataset tab import", lambda: dataset_store.import_files(
                              dataset_store.create_dataset(Path(tmp) / "datasets", "imported"), sources))]:
            try:
                outcome[what] = job()
            except Exception as exc:  # noqa: BLE001 - this is what the benchmark counts
                crashes.append(f"{what}: {type(exc).__name__}: {exc}")
        seconds = time.perf_counter() - started
    pictures = sum(1 for p in sources if p.suffix != ".txt")
    print(f"{pictures} malformed files ({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))}), "
          f"{len(sources) - pictures} with an odd caption, through 3 readers in {seconds:.1f} s")
    if "training scan" in outcome:
        scan = outcome["training scan"]
        print(f"  training scan: {len(scan.items)} usable, {len(scan.skipped)} skipped with a reason, "
              f"{len(scan.ignored)} not pictures, {len(scan.long_captions)} captions cut at 1 MB")
    if "health report" in outcome:
        s = outcome["health report"].summary
        print(f"  health report: {s['usable']} usable, {s['errors']} listed as unreadable")
    if "Dataset tab import" in outcome:
        report = outcome["Dataset tab import"]
        print(f"  import: {len(report.added)} pictures and {len(report.captions)} captions added, "
              f"{len(report.rejected)} refused with a reason")
    print(f"crashes: {len(crashes)}")
    for line in crashes:
        print("  " + line)


if __name__ == "__main__":
    main()
