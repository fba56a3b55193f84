"""What the app's web server serves, to whom, and how big an upload may be (no gradio import here).

``launch.py`` passes these to Gradio's ``launch``:

- only the folders the pages show are served: the datasets (gallery) and the
  runs (samples, LoRA files); never the project's source, ``.git``, the
  models, the app's own job files (``outputs/.app``) or the feature cache;
- every request goes through ``ui.guard.RequestGuard`` (no other web site
  can drive the app);
- an upload is at most ``MAX_UPLOAD_MB`` per file.
"""

from __future__ import annotations

import os
from pathlib import Path

from ui.guard import HostPolicy, RequestGuard
from ui.settings import AppSettings

MAX_UPLOAD_MB = 200  # per file: far above any photo, far below what fills a disk by accident


def served_paths(settings: AppSettings) -> list[str]:
    """Folders whose files the pages show (and so the server may send)."""
    return [str(settings.datasets_dir), str(settings.outputs_dir)]


def blocked_paths(settings: AppSettings) -> list[str]:
    """Inside the served folders, what no page shows: the app's job files and the latent/text cache."""
    return [str(settings.outputs_dir / ".app"), str(settings.outputs_dir / ".cache")]


def launch_options(settings: AppSettings, policy: HostPolicy) -> dict:
    """Keyword arguments for ``Blocks.launch`` that make the server serve only what it should."""
    from starlette.middleware import Middleware

    return dict(
        allowed_paths=served_paths(settings),
        blocked_paths=blocked_paths(settings),
        max_file_size=f"{MAX_UPLOAD_MB}mb",
        app_kwargs={"middleware": [Middleware(RequestGuard, policy=policy)]},
        ssr_mode=False,  # no Node front server: every request reaches the guard
        num_workers=0,  # no separate static-file servers on other ports
        strict_cors=True,
    )


def upload_folder() -> Path:
    """Where Gradio keeps uploaded files until a handler takes them (its GRADIO_TEMP_DIR)."""
    from gradio.utils import get_upload_folder

    return Path(get_upload_folder()).resolve()


def discard_uploads(paths: list[str | os.PathLike]) -> int:
    """Delete Gradio's temporary copies of uploaded files once they have been copied into a dataset.

    Only files inside Gradio's upload folder are touched (never a user's
    original), together with the per-upload folder Gradio made for each when
    it is left empty. Returns how many files were removed.
    """
    root = upload_folder()
    removed = 0
    for path in paths:
        path = Path(path)
        try:
            resolved = path.resolve()
        except OSError:
            continue
        if resolved == root or not resolved.is_relative_to(root) or not resolved.is_file():
            continue
        try:
            resolved.unlink()
            removed += 1
            if resolved.parent != root and not any(resolved.parent.iterdir()):
                resolved.parent.rmdir()
        except OSError:
            continue  # already gone, or held open on Windows: Gradio's own cleanup takes it later
    return removed
