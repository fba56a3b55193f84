"""The layer shapes of a model, without its weights: what memory planning reads.

Each family has a reference architecture kept in ``core/base/architectures/``
(the configs of SD 1.5, SD 2.1 768, SDXL 1.0 base, SD 3.5 Large and Medium,
FLUX.1-dev and schnell), so a plan works with no model downloaded. A local
diffusers folder (or the converted copy of a single file) gives its own
configs instead. ``build_meta`` turns an architecture into
real modules on the meta device: every shape is right, no memory is used.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from core.base.reference import REFERENCE_DIR, VARIANTS, reference_config, reference_data  # noqa: F401


@dataclass(frozen=True)
class Architecture:
    family: str  # sd1, sd2, sdxl, sd3, flux
    source: str  # what the shapes come from: the reference model's name or the model folder
    denoiser: dict  # the UNet's or transformer's config
    text_encoders: tuple[tuple[str, dict], ...]  # (transformers class name, config) in the family's order
    vae: dict

    def __hash__(self) -> int:  # the configs are dicts: hash by their content
        return hash(self.key)

    @property
    def key(self) -> str:
        """Identity of the shapes (not of the source): equal architectures share measurements."""
        blob = json.dumps([self.family, self.denoiser, self.text_encoders, self.vae], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def reference(name: str) -> Architecture:
    """The reference architecture of a family (sd1, sd2, sdxl, sd3 = SD 3.5 Large, flux = FLUX.1-dev) or of a
    variant (sd3-medium, flux-schnell)."""
    from core.base.families import get_family

    family = VARIANTS.get(name, name)
    get_family(family)  # FamilyError for an unknown name
    data = reference_data(name)
    denoiser = data.get("unet") or data["transformer"]
    return Architecture(family, "reference " + data["reference"], denoiser,
                        tuple((e["class"], e["config"]) for e in data["text_encoders"]), data["vae"])


def of_model(path: str, family: str = "auto") -> Architecture:
    """The architecture of ``model.path`` as far as it can be read without loading or downloading weights.

    A local diffusers folder (or an already converted single file) gives its
    own configs. A single file not yet converted gives its family (from its
    key names) and that family's reference shapes; so does a hub id or an
    empty path with ``family`` set. Raises FamilyError/CheckpointError with
    what to do when neither says what the model is.
    """
    from core.base.checkpoints import checkpoint_family, converted_folder, is_single_file
    from core.base.families import FamilyError, detect_family

    local = Path(path).expanduser() if path else None
    folder = None
    if local is not None and local.is_dir():
        folder = local
    elif local is not None and is_single_file(local):
        converted = converted_folder(local)
        folder = converted if (converted / "model_index.json").is_file() else None
        if folder is None:
            return reference(checkpoint_family(local) if family == "auto" else family)
    if folder is None:
        if family == "auto":
            where = ("no model is set" if not path else
                     f"model {path!r} is not a folder or checkpoint file here (hub ids are not downloaded to plan)")
            raise FamilyError(f"cannot tell the model's family: {where}; set model.family (sd1, sd2 or sdxl) or "
                              f"pass --family")
        return reference(family)
    kind = detect_family(folder).name if family == "auto" else family
    from core.base.families import get_family

    return Architecture(kind, str(folder), _config(folder / get_family(kind).denoiser),
                        tuple(_text_encoder(folder / name) for name in reference_names(kind)), _config(folder / "vae"))


def reference_names(family: str) -> tuple[str, ...]:
    from core.base.families import get_family

    return get_family(family).text_encoders


def _config(folder: Path) -> dict:
    data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    return {k: v for k, v in data.items() if not k.startswith("_")}


def _text_encoder(folder: Path) -> tuple[str, dict]:
    config = _config(folder)
    architecture = (config.pop("architectures", None) or ["CLIPTextModel"])[0]
    config.pop("model_type", None)
    return architecture, config


def build_meta(arch: Architecture, dtype=None):
    """(denoiser, [text encoders], vae) with the architecture's shapes on the meta device, frozen."""
    import diffusers
    import torch
    import transformers

    from core.base.families import get_family
    from core.quiet import quiet_local_loading

    kind = get_family(arch.family)
    quiet_local_loading()
    with torch.device("meta"):
        unet = getattr(diffusers, kind.denoiser_class).from_config(arch.denoiser)
        encoders = []
        for cls_name, config in arch.text_encoders:
            cls = getattr(transformers, cls_name)
            encoders.append(cls(cls.config_class(**config)))
        vae = getattr(diffusers, kind.vae_class).from_config(arch.vae)
    for module in (unet, *encoders, vae):
        module.requires_grad_(False)
    if dtype is not None:
        unet.to(dtype)
        for encoder in encoders:
            encoder.to(dtype)
    return unet, encoders, vae
