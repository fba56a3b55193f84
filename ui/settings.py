"""Where the app keeps things, and what it finds there (no gradio here)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL_NAME = "tiny"


@dataclass
class AppSettings:
    root: Path  # the app's home: models/, outputs/, datasets/, presets/ live here

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def outputs_dir(self) -> Path:
        return self.root / "outputs"

    @property
    def datasets_dir(self) -> Path:
        return self.root / "datasets"

    @property
    def presets_dir(self) -> Path:
        return self.root / "presets"

    @classmethod
    def from_env(cls) -> AppSettings:
        """The project folder, or LORA_STUDIO_HOME when set (tests use a temporary one)."""
        return cls(Path(os.environ.get("LORA_STUDIO_HOME", ROOT)).resolve())

    def ensure(self) -> None:
        for folder in (self.models_dir, self.outputs_dir, self.datasets_dir, self.presets_dir):
            folder.mkdir(parents=True, exist_ok=True)

    def resolve(self, path: str | None) -> str:
        """A model or folder field's text as the app means it: a relative path is relative to the app's home
        (``models/tiny-blip``), or to models/ (``tiny-blip``), whichever exists; anything else (an absolute
        path, a hub id such as ``Salesforce/blip-image-captioning-base``) as typed."""
        text = (path or "").strip()
        if not text or Path(text).expanduser().is_absolute():
            return text
        for base in (self.root, self.models_dir):
            if (base / text).exists():
                return str((base / text).resolve())
        return text


def find_models(models_dir: Path) -> list[str]:
    """Base models under models/: diffusers folders (one level, or two for owner/name layouts), then
    single-file checkpoints (.safetensors/.ckpt) of a family this app trains. Hidden folders (the converted
    copies of single files) are skipped."""
    found = []
    for index in sorted(models_dir.glob("*/model_index.json")) + sorted(models_dir.glob("*/*/model_index.json")):
        if not any(part.startswith(".") for part in index.parent.relative_to(models_dir).parts):
            found.append(str(index.parent))
    files = [p for pattern in ("*", "*/*") for p in sorted(models_dir.glob(pattern))
             if p.suffix.lower() in (".safetensors", ".ckpt") and p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(models_dir).parts)]
    found += [str(p) for p in files if _checkpoint_label(p)]
    return found


_LABELS: dict[tuple[str, int], str] = {}  # (path, mtime) -> family label of a single file ("" if not a model)


def _checkpoint_label(path: Path) -> str:
    from core.base.checkpoints import CheckpointError, checkpoint_family
    from core.base.families import get_family

    key = (str(path), path.stat().st_mtime_ns)
    if key not in _LABELS:
        try:
            _LABELS[key] = get_family(checkpoint_family(path)).label
        except CheckpointError:
            _LABELS[key] = ""  # a LoRA, a VAE, an embedding...: not a base model
    return _LABELS[key]


def model_choices(models_dir: Path) -> list[tuple[str, str]]:
    """(label, path) for the model dropdowns: the folder name with its detected family."""
    from core.base.families import FamilyError, detect_family

    choices = []
    for path in find_models(models_dir):
        if Path(path).is_file():
            family = f"{_checkpoint_label(Path(path))}, single file"
        else:
            try:
                family = detect_family(path).label
            except FamilyError:
                family = "not trainable here"
        choices.append((f"{Path(path).relative_to(models_dir).as_posix()} — {family}", path))
    return choices


def lora_choices(outputs_dir: Path) -> list[tuple[str, str]]:
    """The LoRA lists' (label, path) choices: every run's final file first (newest run first), then the step
    checkpoints; short labels (the file name, the run's folder when the name does not say it); a file that
    failed its check is marked."""
    from core.events import LoraVerified, read_typed
    from core.training.run_folder import RunPaths, list_runs

    finals, steps = [], []
    for run in list_runs(outputs_dir):
        paths = RunPaths(run)
        failed = {Path(e.path).name for e in read_typed(paths.events)[0] if isinstance(e, LoraVerified) and not e.ok}
        for path in paths.lora_files():
            label = path.name if path.name.startswith(run.name) else f"{run.name}/{path.name}"
            if path.name in failed:
                label = f"✗ {label} (failed its check)"
            (finals if path == paths.final_lora else steps).append((label, str(path)))
    return finals + steps


def find_loras(outputs_dir: Path) -> list[str]:
    """Every LoRA file of every run: finals and intermediate checkpoints, newest run first.

    Hidden files (a save in progress, or one a kill cut short) are never offered.
    """
    from core.training.run_folder import RunPaths, list_runs

    return [str(path) for run in list_runs(outputs_dir) for path in RunPaths(run).lora_files()]
