"""The engine's training step against a plain reference step, on the same SD-1.5-shaped model.

    python benchmarks/bench_step.py --steps 8 --resolution 256 [--precision no bf16]

The plain step is written here with nothing but the libraries: diffusers'
UNet with a peft LoRA on the attention projections, bitsandbytes' 8-bit
AdamW, on latents and text embeddings computed beforehand; noise, timesteps,
the epsilon loss, backward, optimizer step. The engine's step is the real
``python -m core train`` on pictures of the same size (latents and text
cached), timed from its own progress events. Both skip their first two steps
(warm-up) and print seconds per step and the ratio engine / plain.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

WARMUP = 2


def plain_steps(model: Path, steps: int, resolution: int, precision: str) -> list[float]:
    """Seconds per step of the reference loop (the first WARMUP steps dropped)."""
    import bitsandbytes as bnb
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig

    dtype = {"no": torch.float32, "bf16": torch.bfloat16}[precision]
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", dtype=dtype)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    optimizer = bnb.optim.AdamW8bit(params, lr=1e-4)
    scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    generator = torch.Generator().manual_seed(0)
    side = resolution // 8
    latents = torch.randn(1, 4, side, side, generator=generator)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator)
    unet.train()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=generator)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            prediction = unet(noisy.to(dtype), timesteps, text.to(dtype)).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times[WARMUP:]


def engine_steps(model: Path, steps: int, resolution: int, precision: str, work: Path) -> list[float]:
    """Seconds per step of the real command, from its progress events (the first WARMUP steps dropped)."""
    from bench_train import _toml, make_dataset

    from core.events import read_events

    data = make_dataset(work / "data", 4, resolution)
    overrides = {"model.path": str(model), "dataset.path": str(data), "dataset.resolution": resolution,
                 "dataset.validation_split": 0.0, "lora.rank": 16, "lora.alpha": 16, "train.max_train_steps": steps,
                 "train.mixed_precision": precision, "train.gradient_checkpointing": False,
                 "sample.prompts": [], "sample.at_start": False, "sample.every_n_steps": 0,
                 "output.dir": str(work / "out"), "output.name": f"step-{precision}",
                 "output.save_every_n_steps": 0, "output.save_state": False}
    config = work / "bench.toml"
    config.write_text("")
    cmd = [sys.executable, "-m", "core", "train", str(config), "--no-progress"]
    for key, value in overrides.items():
        cmd += ["--set", f"{key}={_toml(value)}"]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    events, _ = read_events(work / "out" / f"step-{precision}" / "events.jsonl")
    stamps = [e["time"] for e in events if e["type"] == "progress"]
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)][WARMUP - 1:]


def main() -> int:
    from bench_train import ensure_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--precision", nargs="+", default=["no", "bf16"], choices=["no", "bf16"])
    parser.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "lora-studio-bench")
    args = parser.parse_args()
    model = ensure_model("sd15", args.model_dir)
    import torch

    print(f"SD-1.5-shaped random model, {args.resolution} px, batch 1, rank 16, 8-bit AdamW, no checkpointing, "
          f"{torch.get_num_threads()} threads; median s/step over steps {WARMUP + 1}..{args.steps}")
    for precision in args.precision:
        plain = statistics.median(plain_steps(model, args.steps, args.resolution, precision))
        with tempfile.TemporaryDirectory() as tmp:
            engine = statistics.median(engine_steps(model, args.steps, args.resolution, precision, Path(tmp)))
        print(f"  {precision:4}: plain {plain:.3f} s/step, engine {engine:.3f} s/step, engine/plain "
              f"{engine / plain:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
