"""Built-in and saved presets: partial configs ({"section": {"key": value}}) stored as TOML."""

from __future__ import annotations

import tomllib
from pathlib import Path

from core.config import ConfigError

# The built-in presets are "N GB GPU" for each card size, chosen by the planner for the picked model's
# family (core.training.plan.builtin_presets): the fastest settings predicted to fit that card.


def builtin_names() -> list[str]:
    from core.training.plan import CARDS_GB

    return [f"{gb} GB GPU" for gb in CARDS_GB]


def list_presets(presets_dir: Path) -> list[str]:
    saved = sorted(p.stem for p in presets_dir.glob("*.toml")) if presets_dir.is_dir() else []
    return builtin_names() + [name for name in saved if name not in builtin_names()]


def load_preset(presets_dir: Path, name: str, arch=None, resolution: int = 0) -> dict:
    """A saved preset, or a built-in one for ``arch`` (core.base.architecture; default: the SD 1.5 reference)
    at ``resolution`` (0: the family's native size)."""
    if name in builtin_names():
        from core.base.architecture import reference
        from core.training.plan import builtin_presets

        return builtin_presets(arch or reference("sd1"), resolution)[name]
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
    if name in builtin_names():
        raise ConfigError(f"{name!r} is a built-in preset; save under another name")
    path = presets_dir / f"{name}.toml"
    write_text(path, tomli_w.dumps(raw))
    return path
