"""GPU memory of training runs: the planner's estimate against fake-tensor measurements (and CUDA).

    python benchmarks/bench_memory.py            # the table: estimate vs measurement, goals, plans per card
    python benchmarks/bench_memory.py --write    # measure the reference architectures again and write
                                                 # core/training/memory_table.json (a few minutes)
    python benchmarks/bench_memory.py --write --model PATH   # add a model folder's own architecture
    python benchmarks/bench_memory.py --cuda     # also run real steps on the GPU (max_memory_allocated)

Every measurement builds the real architecture on the meta device and runs
one step on fake tensors (core/training/memory.py): no GPU, no download, no
memory.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.training.memory import GiB  # noqa: E402

MATRIX = [  # (family, resolution, batch, precision, checkpointing, train_text_encoder)
    (family, resolution, batch, precision, ckpt, te)
    for family, resolution in (("sd1", 512), ("sd2", 768), ("sdxl", 1024))
    for batch in (1, 2, 4)
    for precision, ckpt, te in (("bf16", True, False), ("bf16", False, False), ("no", True, False),
                                ("bf16", True, True))
]
GOALS = [("SD 1.x 512 px, rank 16, bf16, checkpointing, cached", "sd1", 512, "none", 2.5),
         ("SDXL 1024 px, same", "sdxl", 1024, "none", 6.5),
         ("SDXL 1024 px, NF4 base", "sdxl", 1024, "nf4", 4.0)]


def config_for(family, resolution, batch=1, precision="bf16", ckpt=True, te=False, quantize="none", prompts=()):
    from core import config as config_mod

    return config_mod.with_values(config_mod.TrainConfig(), {
        "model.family": family, "dataset.resolution": resolution, "train.batch_size": batch,
        "train.mixed_precision": precision, "train.gradient_checkpointing": ckpt, "lora.train_text_encoder": te,
        "model.quantize": quantize, "sample.prompts": list(prompts)})


def write_table(models: list[str]) -> None:
    from core.base.architecture import of_model, reference
    from core.training.memory import calibrate
    from core.training.plan import TABLE, table

    rows = table()
    archs = [reference(f) for f in ("sd1", "sd2", "sdxl")] + [of_model(m) for m in models]
    for arch in archs:
        start = time.perf_counter()
        rows[arch.key] = calibrate(arch, progress=lambda text: print("  " + text, flush=True))
        print(f"{arch.source}: measured in {time.perf_counter() - start:.0f} s", flush=True)
    from core.fsutil import write_text

    write_text(TABLE, json.dumps(rows, indent=1) + "\n")
    print(f"wrote {TABLE}")


def accuracy() -> float:
    """Estimate vs fake-tensor measurement of the training step for the whole matrix; the worst error."""
    from core.base.architecture import reference
    from core.training.memory import StepShape, measure_step
    from core.training.plan import estimate

    worst = 0.0
    print(f"{'family':6} {'px':>5} {'batch':>5} {'prec':>5} {'ckpt':>4} {'TE':>3} {'measured':>9} {'estimate':>9} "
          f"{'error':>6} {'secs':>5}")
    for family, resolution, batch, precision, ckpt, te in MATRIX:
        arch = reference(family)
        start = time.perf_counter()
        m = measure_step(arch, StepShape(resolution, batch, precision, ckpt, train_text_encoder=te))
        seconds = time.perf_counter() - start
        measured = m.unet_weights + m.lora + m.step + (m.text_weights if te else 0)
        training = estimate(config_for(family, resolution, batch, precision, ckpt, te), arch).phases["training"]
        predicted = sum(v for k, v in training.items() if k != "optimizer")
        error = predicted / measured - 1
        worst = max(worst, abs(error))
        print(f"{family:6} {resolution:5} {batch:5} {precision:>5} {ckpt!s:>4} {te!s:>3} {measured / GiB:9.3f} "
              f"{predicted / GiB:9.3f} {error:+6.1%} {seconds:5.1f}", flush=True)
    print(f"worst error {worst:.1%} over {len(MATRIX)} configurations")
    return worst


def goals() -> None:
    """The issue's goals: peak allocated of the training phase (bf16, rank 16, checkpointing, cached).

    Fake tensors cannot run bitsandbytes' kernels, so the NF4 row measures the step on the bf16 model and
    counts the UNet's weights as NF4 stores them (the planner's count).
    """
    from core.base.architecture import reference
    from core.training.memory import StepShape, measure_step
    from core.training.plan import estimate, optimizer_bytes

    print("\nGoals (peak allocated while training; bf16, rank 16, checkpointing, cached latents and text):")
    for label, family, resolution, quantize, goal in GOALS:
        arch = reference(family)
        m = measure_step(arch, StepShape(resolution))
        training = estimate(config_for(family, resolution, quantize=quantize), arch).phases["training"]
        weights = training["unet_weights"] if quantize != "none" else m.unet_weights
        measured = weights + m.lora + optimizer_bytes(m.lora_params, "adamw8bit") + m.step
        print(f"  {label}: measured {measured / GiB:.2f} GiB, estimate {sum(training.values()) / GiB:.2f} GiB, "
              f"goal <= {goal} GiB: {'met' if measured / GiB <= goal else 'MISSED'}", flush=True)


def cards() -> None:
    from core.base.architecture import reference
    from core.base.families import get_family
    from core.training.plan import CARDS_GB, fit

    print("\nPlanner, per card (native resolution, rank 16, batch 1, bf16, with sample images):")
    for family in ("sd1", "sd2", "sdxl"):
        native = get_family(family).native_resolution
        for gb in CARDS_GB:
            plan = fit(config_for(family, native, ckpt=False, prompts=["a photo"]), reference(family), gb * GiB)
            chosen = ", ".join(f"{k}={v}" for k, v in plan.settings.items()) or "as is"
            print(f"  {family:4} {native:4} px {gb:2} GB: peak {plan.peak / GiB:5.2f} GiB ({plan.peak_phase}), "
                  f"fits {plan.fits}: {chosen}")


def main() -> int:
    from core.quiet import quiet_libraries

    quiet_libraries()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="measure and write core/training/memory_table.json")
    parser.add_argument("--model", action="append", default=[], help="with --write: a model folder to add")
    args = parser.parse_args()
    if args.write:
        write_table(args.model)
        return 0
    accuracy()
    goals()
    cards()
    return 0


if __name__ == "__main__":
    sys.exit(main())
