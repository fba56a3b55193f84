"""Built-in and saved presets: partial configs ({"section": {"key": value}}) stored as TOML."""

from __future__ import annotations

import tomllib
from pathlib import Path

from core.config import ConfigError

# Settings that fit SD 1.x LoRA training at 512 px on GPUs of that size (starting points, not limits).
# Applied in the Train tab, the resolution becomes the picked model's native one (1024 for SDXL).
BUILTIN = {
    "6 GB GPU": {
        "dataset": {"resolution": 512},
        "lora": {"rank": 8, "alpha": 8.0},
        "train": {"batch_size": 1, "mixed_precision": "fp16", "gradient_checkpointing": True,
                  "optimizer": "adamw8bit", "learning_rate": 1e-4},
    },
    "8 GB GPU": {
        "dataset": {"resolution": 512},
        "lora": {"rank": 16, "alpha": 16.0},
        "train": {"batch_size": 1, "mixed_precision": "fp16", "gradient_checkpointing": True,
                  "optimizer": "adamw8bit", "learning_rate": 1e-4},
    },
    "12 GB GPU": {
        "dataset": {"resolution": 512},
        "lora": {"rank": 32, "alpha": 16.0},
        "train": {"batch_size": 2, "mixed_precision": "bf16", "gradient_checkpointing": False,
                  "optimizer": "adamw8bit", "learning_rate": 1e-4},
    },
    "24 GB GPU": {
        "dataset": {"resolution": 512},
        "lora": {"rank": 64, "alpha": 32.0},
        "train": {"batch_size": 4, "mixed_precision": "bf16", "gradient_checkpointing": False,
                  "optimizer": "adamw8bit", "learning_rate": 2e-4},
    },
}


def list_presets(presets_dir: Path) -> list[str]:
    saved = sorted(p.stem for p in presets_dir.glob("*.toml")) if presets_dir.is_dir() else []
    return list(BUILTIN) + [name for name in saved if name not in BUILTIN]


def load_preset(presets_dir: Path, name: str) -> dict:
    if name in BUILTIN:
        return BUILTIN[name]
    path = presets_dir / f"{name}.toml"
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"preset {name!r} not found in {presets_dir}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"preset file {path} is not valid TOML: {exc}") from None


def save_preset(presets_dir: Path, name: str, raw: dict) -> Path:
    import tomli_w

    from core.fsutil import write_text

    name = name.strip()
    if not name or any(c in name for c in '/\\:*?"<>|') or name.startswith("."):
        raise ConfigError(f"preset name {name!r} cannot be used as a file name")
    if name in BUILTIN:
        raise ConfigError(f"{name!r} is a built-in preset; save under another name")
    path = presets_dir / f"{name}.toml"
    write_text(path, tomli_w.dumps(raw))
    return path
