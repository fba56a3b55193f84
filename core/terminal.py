"""What the command line shows and hears while a job runs: a progress bar fed by the job's events, and
SIGINT/SIGTERM turned into a clean stop."""

from __future__ import annotations

import os
import signal
import sys
import time

# Exit codes of ``python -m core``: bad input (fix the command or the config), or a failure during the run.
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2


def fail(message: str, code: int) -> int:
    """One line on stderr saying what went wrong and what to do; returns the exit code."""
    print(f"error: {message}", file=sys.stderr)
    return code


def is_main_process() -> bool:
    """False in the other processes of a multi-GPU run (accelerate sets RANK): only the first one prints."""
    return os.environ.get("RANK", "0") == "0"


class StopSignal:
    """SIGINT/SIGTERM ask the run to stop after the current step; a second SIGINT aborts."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step and saving (press Ctrl+C again to abort)", file=sys.stderr)

    def __call__(self) -> bool:
        return self.requested


class TerminalProgress:
    """A tqdm bar fed by events: step, loss, it/s and ETA; other events as lines above it."""

    def __init__(self, no_bar: bool = False):
        self.bar = None
        self.phase = None
        self.last_line = 0.0
        self.no_bar = no_bar  # --no-progress: everything but the bar and the step lines
        self.disabled = not is_main_process()

    def __call__(self, event) -> None:
        if self.disabled:
            return
        from tqdm import tqdm

        kind = event.type
        if kind == "phase":
            if event.name != self.phase:
                self.phase = event.name
                self._write(f"{event.name}...")
            elif event.total and event.done == event.total:
                self._write(f"{event.name}: {event.done}/{event.total} done")
        elif kind == "run_started" and sys.stderr.isatty() and not self.no_bar:
            self.bar = tqdm(total=event.total_steps, initial=event.start_step, unit="step", dynamic_ncols=True)
        elif kind == "progress" and self.no_bar:
            return
        elif kind == "progress" and self.bar is not None:
            self.bar.update(event.step - self.bar.n)
            self.bar.set_postfix(loss=f"{event.loss:.4f}", lr=f"{event.lr:.2e}", refresh=False)
        elif kind == "progress" and (time.monotonic() - self.last_line > 2 or event.step == event.total_steps):
            # Not a terminal (the app's log, a file): plain lines, at most one every 2 seconds.
            self.last_line = time.monotonic()
            eta = f"{int(event.eta_s // 60)}:{int(event.eta_s % 60):02d}"
            self._write(f"step {event.step}/{event.total_steps} loss {event.loss:.4f} lr {event.lr:.2e} "
                        f"{event.it_per_s:.2f} it/s ETA {eta}")
        elif kind == "message":
            self._write(f"{event.level}: {event.text}")
        elif kind == "validation_loss":
            what = "validation loss of the EMA weights" if getattr(event, "ema", False) else "validation loss"
            self._write(f"step {event.step}: {what} {event.loss:.5f}{' (best)' if event.best else ''}")
        elif kind == "checkpoint" and event.kind == "lora":
            self._write(f"step {event.step}: saved {event.path}")
        elif kind == "lora_verified":
            change = f", image change {event.mean_change:.2f} of 255" if event.mean_change is not None else ""
            verdict = "OK" if event.ok else "FAILED: " + "; ".join(event.problems[:3])
            self._write(f"check of {os.path.basename(event.path)}: {event.matched}/{event.modules} modules map "
                        f"onto the base model{change}: {verdict}")
        elif kind == "finished":
            self.close()
            print(f"{event.status} at step {event.step}: {event.lora_path}", file=sys.stderr)

    def _write(self, line: str) -> None:
        from tqdm import tqdm

        tqdm.write(line, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
