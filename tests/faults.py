"""Run ``python -m core ...`` with one fault injected, as a real subprocess: for the tests of what the engine
does when the GPU runs out of memory or the disk fills up mid-run.

    python tests/faults.py FAULT STEP [-m core] ARGS...

FAULT is ``oom`` (the training step after STEP raises torch.OutOfMemoryError) or ``enospc`` (once STEP
steps are done, every file write fails with "No space left on device", as on a full disk). The leading
``-m core`` is accepted so this script can stand in for the Python interpreter of ui.runner.RunManager.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def inject(fault: str, after_step: int) -> None:
    import torch

    import core.training.loop as loop

    done = {"steps": 0}
    real_loss = loop.training_loss

    def counting_loss(*args, **kwargs):
        if fault == "oom" and done["steps"] >= after_step:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by the test)")
        done["steps"] += 1
        return real_loss(*args, **kwargs)

    loop.training_loss = counting_loss
    if fault == "enospc":
        import core.fsutil as fsutil

        real_write_all, real_with = fsutil.write_all, fsutil.write_with

        def full() -> bool:
            return done["steps"] > after_step

        def write_all(fd, data):
            if full():
                real_write_all(fd, data[: len(data) // 2])  # a full disk takes part of a write, then refuses
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real_write_all(fd, data)

        def write_with(path, writer, durable=False):
            def cut(tmp):
                writer(tmp)
                if full():
                    with open(tmp, "r+b") as f:
                        f.truncate(os.path.getsize(tmp) // 2)
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            real_with(path, cut, durable)

        fsutil.write_all, fsutil.write_with = write_all, write_with


def main() -> int:
    fault, step, *args = sys.argv[1:]
    if args[:2] == ["-m", "core"]:
        args = args[2:]
    inject(fault, int(step))
    from core.cli import main as cli_main

    return cli_main(args)


if __name__ == "__main__":
    sys.exit(main())
