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


def find_models(models_dir: Path) -> list[str]:
    """Diffusers model folders under models/ (one level, or two for owner/name layouts)."""
    found = []
    for index in sorted(models_dir.glob("*/model_index.json")) + sorted(models_dir.glob("*/*/model_index.json")):
        found.append(str(index.parent))
    return found


def model_choices(models_dir: Path) -> list[tuple[str, str]]:
    """(label, path) for the model dropdowns: the folder name with its detected family."""
    from core.families import FamilyError, detect_family

    choices = []
    for path in find_models(models_dir):
        try:
            family = detect_family(path).label
        except FamilyError:
            family = "not trainable here"
        choices.append((f"{Path(path).relative_to(models_dir).as_posix()} — {family}", path))
    return choices


def find_loras(outputs_dir: Path) -> list[str]:
    """Every LoRA file of every run: finals and intermediate checkpoints, newest run first."""
    runs = sorted((p.parent for p in outputs_dir.glob("*/events.jsonl")),
                  key=lambda p: p.stat().st_mtime, reverse=True)
    files = []
    for run in runs:
        files += sorted(str(p) for p in run.glob("*.safetensors"))
    return files
