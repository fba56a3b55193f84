"""Kill the trainer at many points (mid-step, mid-save, mid-validation) and resume: is the final LoRA the same?

    python benchmarks/crash_resume.py --kills 12 --steps 12

A straight run of the tiny model trains STEPS steps, saving the LoRA and the resume state every step. Then,
for each kill point, a fresh run is killed with SIGKILL (no chance to clean up) at a step and a delay
drawn from a fixed seed, resumed with ``--resume`` (from scratch when it died before its first save), and
killed again while resuming when the plan says so, until it completes. Each final LoRA is compared with
the straight run's, tensor by tensor. Also checked after every kill: events.jsonl reads, no hidden
temporary file is left once the run resumes, and the run's status is "interrupted".
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def start(config: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "core", "train", str(config), "--no-progress", *extra], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def kill_at(proc: subprocess.Popen, events: Path, step: int, delay: float) -> bool:
    """SIGKILL once the run reports ``step`` (plus ``delay`` seconds); False if it finished first."""
    from core.events import read_events

    while proc.poll() is None:
        if any(e["type"] == "progress" and e["step"] >= step for e in read_events(events)[0]):
            time.sleep(delay)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True
            return False
        time.sleep(0.02)
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=12, help="runs to kill (some are killed twice)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import torch
    from safetensors.torch import load_file

    from core import config as config_mod
    from core.base.tiny import write_tiny_model
    from core.events import read_events
    from core.training.run_folder import latest_state, run_status
    from tests.conftest import tiny_config, write_dataset

    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = write_tiny_model(tmp / "tiny")
        data = write_dataset(tmp / "pictures", n=6)
        overrides = {"train.max_train_steps": args.steps, "output.save_every_n_steps": 1, "output.keep_states": 2,
                     "sample.every_n_steps": 3, "sample.steps": 2}

        def config(name: str) -> Path:
            path = tmp / f"{name}.toml"
            config_mod.save(tiny_config(model, data, tmp / "out", name=name, **overrides), path)
            return path

        straight = start(config("straight"))
        assert straight.wait() == 0, straight.stderr.read()
        reference = load_file(tmp / "out" / "straight" / "straight.safetensors")
        identical, kills, restarts, worst = 0, 0, 0, 0.0
        for i in range(args.kills):
            name = f"kill{i}"
            path = config(name)
            run_dir = tmp / "out" / name
            plan = [(rng.randint(1, args.steps - 1), rng.random() * 0.6)]
            if rng.random() < 0.4:
                plan.append((rng.randint(plan[0][0], args.steps - 1), rng.random() * 0.6))  # killed again
            proc = start(path)
            for step, delay in plan:
                if not kill_at(proc, run_dir / "events.jsonl", step, delay):
                    break
                kills += 1
                read_events(run_dir / "events.jsonl")  # must not raise
                status = run_status(run_dir)
                assert status.state == "interrupted", status
                resume = ("--resume",) if latest_state(run_dir) else ("--set", "output.overwrite=true")
                restarts += 1
                proc = start(path, *resume)
            out = proc.communicate()[1]
            assert proc.returncode == 0, out
            leftovers = [p for p in run_dir.rglob(".*")]
            assert not leftovers, leftovers
            final = load_file(run_dir / f"{name}.safetensors")
            same = final.keys() == reference.keys() and all(torch.equal(final[k], reference[k]) for k in final)
            diff = max(float((final[k].float() - reference[k].float()).abs().max()) for k in final)
            worst = max(worst, diff)
            identical += same
            print(f"run {i}: killed at {', '.join(f'step {s} + {d:.2f} s' for s, d in plan)} -> "
                  f"{'identical' if same else f'differs by up to {diff:.2e}'}", flush=True)
    print(f"{kills} SIGKILLs over {args.kills} runs, {restarts} resumes: {identical} of {args.kills} final LoRAs "
          f"bit-identical to the straight run (largest difference {worst:.2e})")


if __name__ == "__main__":
    main()
