"""GPU memory of training runs: the planner's estimate against fake-tensor measurements (and CUDA).

    python benchmarks/bench_memory.py            # the table: estimate vs measurement, goals, plans per card
    python benchmarks/bench_memory.py --write    # measure the reference architectures again and write
                                                 # core/training/memory_table.json (a few minutes)
    python benchmarks/bench_memory.py --write --model PATH   # add a model folder's own architecture
    python benchmarks/bench_memory.py --write --reference flux   # measure one reference model again
    python benchmarks/bench_memory.py --flow     # the flow families (SD 3.5, FLUX.1/2, Z-Image), goals, cards
    python benchmarks/bench_memory.py --cuda     # on a GPU: real steps (max_memory_allocated) against both
    python benchmarks/bench_memory.py --toggles 6    # each setting: planned memory and step time here
    python benchmarks/bench_memory.py --quality 40   # each base precision: validation loss, speed

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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from core.training.memory import GiB  # noqa: E402

MATRIX = [  # (family, resolution, batch, precision, checkpointing, train_text_encoder)
    (family, resolution, batch, precision, ckpt, te)
    for family, resolution in (("sd1", 512), ("sd2", 768), ("sdxl", 1024))
    for batch in (1, 2, 4)
    for precision, ckpt, te in (("bf16", True, False), ("bf16", False, False), ("no", True, False),
                                ("bf16", True, True))
]
# Off the points the coefficients were measured at (half and full native size, batch 1).
MATRIX += [("sd1", 768, 1, "bf16", True, False), ("sd1", 384, 3, "no", False, False),
           ("sd2", 512, 2, "bf16", False, False), ("sdxl", 768, 2, "bf16", True, False),
           ("sdxl", 1280, 1, "bf16", True, False)]
# The flow transformers: at the measured points and off them (768 px, batch 2, no checkpointing).
MATRIX += [(family, resolution, batch, "bf16", ckpt, False)
           for family in ("sd3-medium", "sd3", "flux", "flux2", "zimage")
           for resolution, batch, ckpt in ((1024, 1, True), (768, 2, True), (768, 1, False))]
GOALS = [("SD 1.x 512 px, rank 16, bf16, checkpointing, cached", "sd1", 512, "none", 2.5),
         ("SDXL 1024 px, same", "sdxl", 1024, "none", 6.5),
         ("SDXL 1024 px, NF4 base", "sdxl", 1024, "nf4", 4.0),
         ("FLUX.1-dev 512 px, NF4 base", "flux", 512, "nf4", 8.0),
         ("SD 3.5 Large 512 px, NF4 base", "sd3", 512, "nf4", 8.0),
         ("SD 3.5 Medium 512 px, bf16 base", "sd3-medium", 512, "none", 6.0)]
FLOW = ("sd3-medium", "sd3", "flux", "flux2", "zimage")


def config_for(family, resolution, batch=1, precision="bf16", ckpt=True, te=False, quantize="none", prompts=()):
    from core import config as config_mod
    from core.base.reference import VARIANTS

    return config_mod.with_values(config_mod.TrainConfig(), {
        "model.family": VARIANTS.get(family, family), "dataset.resolution": resolution, "train.batch_size": batch,
        "train.mixed_precision": precision, "train.gradient_checkpointing": ckpt, "lora.train_text_encoder": te,
        "model.quantize": quantize, "sample.prompts": list(prompts)})


REFERENCES = ("sd1", "sd2", "sdxl", "sd3", "sd3-medium", "flux", "flux2", "flux2-9b", "zimage")


def write_table(models: list[str], references=REFERENCES) -> None:
    from core.base.architecture import of_model, reference
    from core.training.memory import calibrate
    from core.training.plan import TABLE, table

    rows = dict(table())
    archs = [reference(f) for f in references] + [of_model(m) for m in models]
    for arch in archs:
        start = time.perf_counter()
        rows[arch.key] = calibrate(arch, progress=lambda text: print("  " + text, flush=True))
        print(f"{arch.source}: measured in {time.perf_counter() - start:.0f} s", flush=True)
    from core.fsutil import write_text

    write_text(TABLE, json.dumps(rows, indent=1) + "\n")
    table.cache_clear()
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
    from core.base.reference import VARIANTS
    from core.training.plan import CARDS_GB, fit

    print("\nPlanner, per card (native resolution, rank 16, batch 1, bf16, with sample images):")
    for family in ("sd1", "sd2", "sdxl", *FLOW):
        native = get_family(VARIANTS.get(family, family)).native_resolution
        for gb in CARDS_GB:
            plan = fit(config_for(family, native, ckpt=False, prompts=["a photo"]), reference(family), gb * GiB)
            chosen = ", ".join(f"{k}={v}" for k, v in plan.settings.items()) or "as is"
            print(f"  {family:4} {native:4} px {gb:2} GB: peak {plan.peak / GiB:5.2f} GiB ({plan.peak_phase}), "
                  f"fits {plan.fits}: {chosen}")


def flow_table() -> None:
    """The flow families on their real architectures: the training phase's peak allocated memory at 512 and
    1024 px with the bf16 and the NF4 base (rank 16, bf16, checkpointing, cached latents and text), from a
    fake-tensor step (the NF4 weights counted as bitsandbytes stores them), and the planner's whole-run peak
    with its margins (the T5 / Qwen3 encoder stored like the base while caching)."""
    from core.base.architecture import reference
    from core.training.memory import StepShape, measure_step
    from core.training.plan import estimate, optimizer_bytes

    print("\nFlow families (rank 16, bf16, checkpointing, cached; GiB): training step measured on fake tensors | "
          "planner's run peak with margins (phase)")
    for name in FLOW:
        arch = reference(name)
        for resolution in (512, 1024):
            m = measure_step(arch, StepShape(resolution))
            cells = []
            for quantize in ("none", "nf4"):
                plan = estimate(config_for(name, resolution, quantize=quantize, prompts=["a photo"]), arch)
                weights = plan.phases["training"]["unet_weights"] if quantize != "none" else m.unet_weights
                measured = weights + m.lora + optimizer_bytes(m.lora_params, "adamw8bit") + m.step
                cells.append(f"{quantize:4} {measured / GiB:6.2f} | {plan.peak / GiB:6.2f} ({plan.peak_phase})")
            print(f"  {name:10} {resolution:4} px: " + "; ".join(cells), flush=True)


def on_cuda() -> None:
    """Real steps of the reference architectures on the GPU: max_memory_allocated against the fake-tensor
    measurement and the estimate, and step time."""
    import torch

    from core.base.architecture import reference
    from core.training.memory import StepShape, measure_step, measure_step_cuda

    print(f"\nOn {torch.cuda.get_device_name(0)} (allocated by the step above weights and inputs):")
    for family, resolution in (("sd1", 512), ("sd2", 768), ("sdxl", 1024)):
        for batch in (1, 4):
            for ckpt in (True, False):
                shape = StepShape(resolution, batch, "bf16", ckpt)
                try:
                    cuda = measure_step_cuda(reference(family), shape)
                except torch.OutOfMemoryError:
                    print(f"  {family} {resolution} px batch {batch} ckpt {ckpt}: out of memory")
                    torch.cuda.empty_cache()
                    continue
                fake = measure_step(reference(family), shape)
                print(f"  {family} {resolution} px batch {batch} ckpt {ckpt}: GPU {cuda.step / GiB:.3f} GiB, "
                      f"fake tensors {fake.step / GiB:.3f} GiB ({fake.step / cuda.step - 1:+.1%}), "
                      f"reserved {torch.cuda.max_memory_reserved() / GiB:.2f} GiB", flush=True)


def quality(steps: int) -> None:
    """The cost of each base precision: the same short run of the tiny model with each model.quantize,
    its final validation loss and steps per second (CPU)."""
    import tempfile

    from core import config as config_mod
    from core.base.tiny import build_pipeline
    from core.training import train
    from tests.conftest import write_dataset

    print(f"\nQuality and speed of the base precisions (tiny model, {steps} steps, bf16, same seed):")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_pipeline("tiny").save_pretrained(root / "tiny")
        data = write_dataset(root / "data", n=12)
        for quantize in ("none", "int8", "nf4", "fp8"):
            config = config_mod.from_dict({
                "model": {"path": str(root / "tiny"), "quantize": quantize},
                "dataset": {"path": str(data), "resolution": 64, "validation_split": 0.25},
                "lora": {"rank": 8, "alpha": 8.0},
                "train": {"max_train_steps": steps, "learning_rate": 1e-3, "mixed_precision": "bf16"},
                "sample": {"prompts": [], "every_n_steps": 0, "at_start": True},
                "output": {"dir": str(root / "out"), "name": quantize, "save_every_n_steps": 0}})
            events = []
            start = time.perf_counter()
            result = train.run(config, events.append)
            seconds = time.perf_counter() - start
            rates = [e.it_per_s for e in events if e.type == "progress"]
            losses = result.validation_losses
            print(f"  {quantize:5}: validation loss {losses[0]:.4f} at step 0 -> {losses[steps]:.4f} at step {steps}, "
                  f"{rates[-1]:.1f} steps/s, whole run {seconds:.1f} s", flush=True)


TOGGLES = [  # (label, settings changed from bf16 + checkpointing + cached latents + full base)
    ("bf16, checkpointing, cached (base)", {}),
    ("no checkpointing", {"train.gradient_checkpointing": False}),
    ("fp32", {"train.mixed_precision": "no"}),
    ("latents not cached", {"dataset.cache_latents": False}),
    ("torch AdamW", {"train.optimizer": "adamw"}),
    ("int8 base", {"model.quantize": "int8"}),
    ("NF4 base", {"model.quantize": "nf4"}),
    ("fp8 storage", {"model.quantize": "fp8"}),
    ("group offloading (linear layers)", {"model.group_offload": True}),
    ("optimizer paged_adamw8bit", {"train.optimizer": "paged_adamw8bit"}),
    ("optimizer lion8bit", {"train.optimizer": "lion8bit", "train.learning_rate": 1e-5}),
    ("optimizer prodigy", {"train.optimizer": "prodigy", "train.learning_rate": 1.0}),
    ("optimizer adafactor", {"train.optimizer": "adafactor"}),
    ("optimizer schedulefree_adamw", {"train.optimizer": "schedulefree_adamw"}),
    ("LoRA+ (ratio 16)", {"train.loraplus_lr_ratio": 16.0}),
    ("adapter locon (conv rank 8)", {"lora.type": "locon", "lora.conv_rank": 8, "lora.conv_alpha": 4.0}),
    ("adapter loha", {"lora.type": "loha"}),
    ("adapter lokr", {"lora.type": "lokr"}),
    ("adapter lora + dora", {"lora.dora": True}),
    ("masked loss", {"dataset.masked_loss": True}),
    ("ema (every step)", {"train.ema": True}),
    ("long captions (225 tokens)", {"dataset.max_token_length": 225}),
    ("random crop + colour jitter (latents not cached)", {"dataset.cache_latents": False, "dataset.random_crop": True,
                                                          "dataset.color_jitter": 0.1}),
    ("huber loss, debiased, pyramid noise", {"train.loss_type": "huber", "train.debiased_estimation": True,
                                             "train.multires_noise_iterations": 6}),
]


def toggles(steps: int, resolution: int, only: str = "") -> None:
    """Each setting's effect on the planned peak (SD 1.5 reference at 512 px) and on the engine's step time
    (the SD-1.5-shaped random model on this machine at ``resolution``; median after two warm-up steps)."""
    import statistics
    import tempfile

    from bench_train import ensure_model, make_dataset

    from core import config as config_mod
    from core.base.architecture import reference
    from core.training import train
    from core.training.plan import estimate

    model = ensure_model("sd15", Path(tempfile.gettempdir()) / "lora-studio-bench")
    print(f"\nEach setting: planned peak allocated while training (SD 1.5, 512 px, rank 16) and the engine's "
          f"step time here (SD-1.5-shaped random model, {resolution} px, median of steps 3..{steps}):")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = make_dataset(root / "data", 4, resolution)
        for label, change in TOGGLES:
            if only and not any(part in label for part in only.split(",")) and label != TOGGLES[0][0]:
                continue
            values = {"model.path": str(model), "dataset.path": str(data), "dataset.resolution": resolution,
                      "dataset.validation_split": 0.0, "dataset.cache_dir": str(root / "cache"),
                      "dataset.cache_while_training": False,  # the steps timed are steady ones
                      "train.mixed_precision": "bf16", "train.gradient_checkpointing": True,
                      "train.max_train_steps": steps, "lora.rank": 16, "lora.alpha": 16.0,
                      "sample.prompts": [], "sample.at_start": False, "sample.every_n_steps": 0,
                      "output.dir": str(root / "out"), "output.name": f"t{TOGGLES.index((label, change))}",
                      "output.save_every_n_steps": 0, "output.save_state": False, **change}
            config = config_mod.with_values(config_mod.TrainConfig(), values)
            events = []
            train.run(config, events.append)
            stamps = [e.time for e in events if e.type == "progress"]
            step = statistics.median(b - a for a, b in zip(stamps[1:], stamps[2:], strict=False))
            planned = estimate(config_mod.with_values(config, {"dataset.resolution": 512}), reference("sd1"))
            print(f"  {label:36} {sum(planned.phases['training'].values()) / GiB:6.2f} GiB  {step:6.2f} s/step",
                  flush=True)


def flops() -> None:
    from core.base.architecture import reference
    from core.training.memory import StepShape, step_flops

    print("\nFLOPs of one training step (forward and backward, bf16, FlopCounterMode on fake tensors):")
    for family, resolution in (("sd1", 512), ("sdxl", 1024)):
        plain = step_flops(reference(family), StepShape(resolution, 1, "bf16", False))
        ckpt = step_flops(reference(family), StepShape(resolution, 1, "bf16", True))
        print(f"  {family} {resolution} px batch 1: {plain / 1e12:.2f} TFLOP, with checkpointing's "
              f"recomputation {ckpt / 1e12:.2f} TFLOP", flush=True)


def matmul_peak() -> float:
    """The card's bf16 matrix-multiply rate as measured here (FLOP/s), the ceiling MFU is read against."""
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    return 20 * 2 * 8192**3 / (time.perf_counter() - start)


def utilisation() -> None:
    """Steps per second and model-FLOP utilisation (FLOPs of the step without recomputation, counted by
    FlopCounterMode, against the measured bf16 matmul rate) on the GPU."""
    from core.base.architecture import reference
    from core.training.memory import StepShape, cuda_step_seconds, step_flops

    peak = matmul_peak()
    print(f"\nbf16 matmul rate measured on this card: {peak / 1e12:.0f} TFLOP/s")
    for family, resolution in (("sd1", 512), ("sdxl", 1024)):
        for batch in (1, 2, 4):
            flops = step_flops(reference(family), StepShape(resolution, batch, "bf16", False))
            for ckpt in (False, True):
                seconds = cuda_step_seconds(reference(family), StepShape(resolution, batch, "bf16", ckpt))
                print(f"  {family} {resolution} px batch {batch} checkpointing {ckpt}: {1 / seconds:.2f} it/s, "
                      f"{flops / 1e12:.2f} TFLOP a step, MFU {flops / seconds / peak:.1%}", flush=True)


def main() -> int:
    from core.quiet import quiet_libraries

    quiet_libraries()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="measure and write core/training/memory_table.json")
    parser.add_argument("--model", action="append", default=[], help="with --write: a model folder to add")
    parser.add_argument("--reference", action="append", choices=REFERENCES, default=[],
                        help="with --write: measure only these reference models (default: all)")
    parser.add_argument("--cuda", action="store_true", help="also measure real steps on the GPU")
    parser.add_argument("--toggles", type=int, default=0, metavar="STEPS",
                        help="only each setting's planned memory and measured step time, with this many steps")
    parser.add_argument("--resolution", type=int, default=256, help="with --toggles: training resolution here")
    parser.add_argument("--only", default="", help="with --toggles: only the settings whose label has this text "
                                                   "(several, separated by commas)")
    parser.add_argument("--flow", action="store_true",
                        help="only the flow families' table, the goals and the per-card plans")
    parser.add_argument("--quality", type=int, default=0, metavar="STEPS",
                        help="only the quality/speed table of the base precisions, with this many steps")
    args = parser.parse_args()
    if args.write:
        write_table(args.model, args.reference or REFERENCES)
        return 0
    if args.quality:
        quality(args.quality)
        return 0
    if args.toggles:
        toggles(args.toggles, args.resolution, args.only)
        return 0
    if args.flow:
        goals()
        flow_table()
        cards()
        return 0
    accuracy()
    goals()
    flow_table()
    cards()
    flops()
    if args.cuda:
        on_cuda()
        utilisation()
    return 0


if __name__ == "__main__":
    sys.exit(main())
