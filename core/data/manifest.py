"""The dataset manifest: a user's choices about a dataset, kept beside it in ``dataset.toml``.

Nothing about a picture's fate is encoded in file or folder names (no
``10_name class`` folders) and nothing is deleted or moved: the manifest
records, per image, whether it is excluded from training or kept despite a
health warning, and, per subfolder ("concept"), how many times its images
repeat per epoch. The engine (``core.data.dataset.scan_dataset``) and the health
report read it; the Dataset tab writes it. It is plain TOML and safe to edit
by hand::

    version = 1

    [concepts."close-ups"]
    repeats = 3

    [images."photos/IMG 0042.jpg"]
    decision = "exclude"           # or "keep"
    reason = "blurry"

Paths are relative to the dataset folder, with ``/`` separators.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

MANIFEST_NAME = "dataset.toml"
MANIFEST_VERSION = 1
DECISIONS = ("exclude", "keep")
MAX_REPEATS = 10000


class ManifestError(ValueError):
    """dataset.toml cannot be read; the message names the file, the entry and what to do."""


@dataclass
class Decision:
    decision: str  # "exclude" or "keep"
    reason: str = ""


@dataclass
class Manifest:
    images: dict[str, Decision] = field(default_factory=dict)  # relative posix path -> decision
    concepts: dict[str, int] = field(default_factory=dict)  # relative posix folder -> repeats

    def decision(self, rel: str) -> str | None:
        entry = self.images.get(rel)
        return entry.decision if entry else None

    def is_excluded(self, rel: str) -> bool:
        return self.decision(rel) == "exclude"

    def repeats_for(self, rel: str) -> int:
        """Repeats of the image at ``rel``: those of its nearest folder listed as a concept, else 1."""
        for folder in PurePosixPath(rel).parents:
            key = folder.as_posix()
            if key != "." and key in self.concepts:
                return self.concepts[key]
        return 1

    def to_toml(self) -> str:
        import tomli_w

        raw: dict = {"version": MANIFEST_VERSION}
        if self.concepts:
            raw["concepts"] = {name: {"repeats": n} for name, n in sorted(self.concepts.items())}
        if self.images:
            raw["images"] = {rel: _decision_table(d) for rel, d in sorted(self.images.items())}
        header = "# LoRA Studio dataset manifest: excluded/kept images and per-folder repeats. Safe to edit.\n"
        return header + tomli_w.dumps(raw)


def _decision_table(d: Decision) -> dict:
    return {"decision": d.decision, "reason": d.reason} if d.reason else {"decision": d.decision}


def manifest_path(folder: str | Path) -> Path:
    return Path(folder) / MANIFEST_NAME


def load_manifest(folder: str | Path) -> Manifest:
    """The manifest of the dataset at ``folder``; an empty one when there is no dataset.toml."""
    path = manifest_path(folder)
    if not path.is_file():
        return Manifest()
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path} is not valid TOML ({exc}); fix the file or delete it to start over "
                            f"(it only holds exclusions and repeats)") from None
    version = raw.get("version", MANIFEST_VERSION)
    if not isinstance(version, int) or version > MANIFEST_VERSION:
        raise ManifestError(f"{path} has version {version!r}, newer than this app understands "
                            f"({MANIFEST_VERSION}); update LoRA Studio")
    return Manifest(_read_images(path, raw.get("images", {})), _read_concepts(path, raw.get("concepts", {})))


def _read_images(path: Path, table) -> dict[str, Decision]:
    if not isinstance(table, dict):
        raise ManifestError(f"{path}: [images] must be a table of \"file\" = {{ decision = ... }} entries")
    images = {}
    for rel, entry in table.items():
        value = entry.get("decision") if isinstance(entry, dict) else entry
        if value not in DECISIONS:
            raise ManifestError(f"{path}: images.\"{rel}\".decision is {value!r}; use one of "
                                f"{', '.join(repr(d) for d in DECISIONS)}")
        reason = entry.get("reason", "") if isinstance(entry, dict) else ""
        images[normalise(rel)] = Decision(value, str(reason))
    return images


def _read_concepts(path: Path, table) -> dict[str, int]:
    if not isinstance(table, dict):
        raise ManifestError(f"{path}: [concepts] must be a table of \"folder\" = {{ repeats = N }} entries")
    concepts = {}
    for name, entry in table.items():
        repeats = entry.get("repeats") if isinstance(entry, dict) else None
        if not isinstance(repeats, int) or isinstance(repeats, bool) or not 1 <= repeats <= MAX_REPEATS:
            raise ManifestError(f"{path}: concepts.\"{name}\".repeats is {repeats!r}; use a whole number "
                                f"from 1 to {MAX_REPEATS}")
        concepts[normalise(name)] = repeats
    return concepts


def normalise(rel: str) -> str:
    """A relative path as the manifest stores it: ``/`` separators, no leading ``./`` or trailing ``/``."""
    text = str(rel).replace("\\", "/").strip("/")
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts) or not parts:
        raise ManifestError(f"{rel!r} is not a path inside the dataset folder")
    return "/".join(parts)


def save_manifest(folder: str | Path, manifest: Manifest) -> Path:
    from core.fsutil import write_text

    path = manifest_path(folder)
    write_text(path, manifest.to_toml())
    return path


def set_decision(folder: str | Path, rel: str, decision: str | None, reason: str = "") -> Manifest:
    """Record (or with ``None`` forget) the decision about one image; returns the saved manifest."""
    if decision is not None and decision not in DECISIONS:
        raise ManifestError(f"decision {decision!r} is not one of {', '.join(DECISIONS)}")
    manifest = load_manifest(folder)
    rel = normalise(rel)
    if decision is None:
        manifest.images.pop(rel, None)
    else:
        manifest.images[rel] = Decision(decision, reason)
    save_manifest(folder, manifest)
    return manifest


def set_repeats(folder: str | Path, subfolder: str, repeats: int) -> Manifest:
    """Set how many times the images under ``subfolder`` repeat per epoch (1 removes the entry)."""
    if not isinstance(repeats, int) or not 1 <= repeats <= MAX_REPEATS:
        raise ManifestError(f"repeats for {subfolder!r} is {repeats!r}; use a whole number from 1 to {MAX_REPEATS}")
    rel = normalise(subfolder)
    if not (Path(folder) / rel).is_dir():
        raise ManifestError(f"{rel!r} is not a subfolder of {folder}; concepts are subfolders of the dataset")
    manifest = load_manifest(folder)
    if repeats == 1:
        manifest.concepts.pop(rel, None)
    else:
        manifest.concepts[rel] = repeats
    save_manifest(folder, manifest)
    return manifest
