"""Keeping the libraries quiet, so the engine's own lines (progress, warnings, errors) stay readable.

A leaf module: every part that loads models (core.base.models, core.base.checkpoints,
core.base.sample, the captioners) and the command line use it, and it imports
nothing of the project.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


def quiet_libraries() -> None:
    """Only errors from the libraries' loggers, and not the harmless bitsandbytes "kernels" warning."""
    import logging
    import warnings

    for name in ("diffusers", "transformers", "accelerate", "peft", "bitsandbytes"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*kernels.*")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


def quiet_local_loading() -> None:
    """Turn off per-file "Loading weights" bars (after any download, whose bar is worth seeing)."""
    import diffusers.utils.logging
    import transformers.utils.logging

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No per-file progress bars while loading or saving (they would bury the job's own lines)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
