"""Single-file base models (``.safetensors`` / ``.ckpt`` from model sites) as diffusers folders.

Most people keep their base models as one original-format file. The engine
works on diffusers folders, so a single file is converted once with
diffusers' own single-file loader and kept beside it in a hidden
``.diffusers/<name>-<digest>/`` folder; later runs reuse it (delete it any
time). The conversion needs the family's configs and tokenizers (they are
not inside the file). They are looked up locally first, so it works offline:

1. ``models/configs/<family>/`` (``sd1``, ``sd2``, ``sdxl``, ``sd3``, ``flux``): a
   diffusers folder of that family; for the SD families its JSON configs and
   tokenizer files are enough; SD 3.5 and FLUX files usually hold only the
   transformer, so their folder also gives the weights of the text encoders
   and the VAE (see ``core.base.flow_checkpoint``);
2. any diffusers model of the same family elsewhere in ``models/``;
3. otherwise the family's reference model on the Hugging Face hub (online
   only); offline, the error says exactly which folder to create.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
CONVERTED_DIR = ".diffusers"
# The reference diffusers repository of each family (its configs and tokenizers).
REFERENCE_REPOS = {
    "sd1": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd2": "stabilityai/stable-diffusion-2-1",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "sd3": "stabilityai/stable-diffusion-3.5-large",
    "flux": "black-forest-labs/FLUX.1-dev",
    "flux2": "black-forest-labs/FLUX.2-klein-base-4B",
    "zimage": "Tongyi-MAI/Z-Image-Turbo",
}



class CheckpointError(RuntimeError):
    """A single-file model cannot be used; the message says what is missing and what to do."""


def is_single_file(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_file() and path.suffix.lower() in SINGLE_FILE_SUFFIXES


def checkpoint_family(path: str | os.PathLike) -> str:
    """sd1, sd2, sdxl, sd3 or flux from the checkpoint's key names (read from the header only for .safetensors)."""
    from core.base.flow_checkpoint import transformer_file_family

    keys = _keys(Path(path))
    flow = transformer_file_family(keys)
    if flow is not None:
        return flow
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"  # OpenCLIP text encoder
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1"
    if any(k.startswith("lora_") for k in keys):
        raise CheckpointError(f"{path} is a LoRA, not a base model; pick it in the Prompt tab's LoRA list")
    raise CheckpointError(f"{path} is not an SD 1.x, SD 2.x, SDXL, SD 3.5 or FLUX.1 checkpoint (no text encoder or "
                          f"transformer keys this app knows); use a diffusers folder or a checkpoint of one of "
                          f"those families")


def _keys(path: Path) -> list[str]:
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), "pt") as f:
                return list(f.keys())
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{path} cannot be read as a .safetensors checkpoint: {exc}") from None
    import torch

    try:
        data = torch.load(str(path), map_location="meta", weights_only=True)
    except Exception as exc:  # pickle and zip errors come in many kinds
        raise CheckpointError(f"{path} cannot be read as a .ckpt checkpoint ({type(exc).__name__}: {exc}); "
                              f"if it is from a site you trust, convert it to .safetensors") from None
    return list(data.get("state_dict", data).keys())


def converted_folder(path: Path) -> Path:
    """Where the diffusers copy of ``path`` lives: keyed by name, size and modification time."""
    stat = path.stat()
    digest = hashlib.sha256(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return path.parent / CONVERTED_DIR / f"{path.stem}-{digest}"


def find_config_folder(family: str, models_dir: Path | None) -> Path | None:
    """A local diffusers folder whose configs and tokenizers serve ``family`` (see the module docstring)."""
    from core.base.families import FamilyError, detect_family

    if models_dir is None or not models_dir.is_dir():
        return None
    named = models_dir / "configs" / family
    if (named / "model_index.json").is_file():
        return named
    for index in sorted(models_dir.glob("*/model_index.json")) + sorted(models_dir.glob("*/*/model_index.json")):
        folder = index.parent
        if any(part.startswith(".") for part in folder.relative_to(models_dir).parts):
            continue
        try:
            if detect_family(folder).name == family:
                return folder
        except FamilyError:
            continue
    return None


def convert(path: str | os.PathLike, models_dir: str | os.PathLike | None = None) -> Path:
    """The diffusers folder of a single-file model, converting it on first use."""
    path = Path(path).resolve()
    target = converted_folder(path)
    if (target / "model_index.json").is_file():
        return target
    family = checkpoint_family(path)
    # models/x.safetensors or models/<group>/x.safetensors: look in the folder and the one above
    roots = [Path(models_dir)] if models_dir else [path.parent, path.parent.parent]
    config = next((c for c in (find_config_folder(family, root) for root in roots) if c), None)
    models_dir = roots[0]
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    if family in ("sd3", "flux", "flux2", "zimage"):  # the transformer from the file, the rest from a folder
        _convert_transformer(path, family, config, target, offline)
        return target
    if config is None and offline:
        raise CheckpointError(
            f"{path.name} is an {_label(family)} single-file checkpoint; converting it offline needs that "
            f"family's configs and tokenizers. Put a diffusers {_label(family)} folder (its .json and tokenizer "
            f"files are enough) at {models_dir / 'configs' / family}, e.g. with `hf download "
            f"{REFERENCE_REPOS[family]} --include '*.json' '*.txt' --local-dir {models_dir / 'configs' / family}`"
            f" on a computer that is online")
    _convert(path, family, str(config) if config else REFERENCE_REPOS[family], target, offline)
    return target


def _convert_transformer(path: Path, family: str, companion: Path | None, target: Path, offline: bool) -> None:
    """An SD 3.5 / FLUX transformer file with the text encoders, tokenizers and VAE of ``companion`` (fetched
    from the hub when online and none is local); the error names what is missing and how to get it."""
    from core.base.families import get_family
    from core.base.flow_checkpoint import convert_transformer_file
    from core.quiet import quiet_local_loading

    kind = get_family(family)
    if path.suffix.lower() != ".safetensors":
        raise CheckpointError(f"{path.name}: {kind.label} transformer files are read as .safetensors only")
    if companion is None and not offline:
        from diffusers import DiffusionPipeline

        try:
            companion = Path(DiffusionPipeline.download(REFERENCE_REPOS[family]))
        except Exception as exc:  # hub errors come in many classes; all mean "could not fetch"
            raise CheckpointError(f"{path.name} holds a {kind.label} transformer; its text encoders and VAE come "
                                  f"from {REFERENCE_REPOS[family]}, which could not be fetched "
                                  f"({type(exc).__name__}: {exc})") from None
    needed = [p for p in kind.missing_parts(companion) if p != kind.denoiser] if companion else None
    if companion is None or needed:
        where = f"{companion} lacks {', '.join(needed)}" if companion else "none was found in models/"
        raise CheckpointError(
            f"{path.name} holds only a {kind.label} transformer; the text encoders ({', '.join(kind.text_encoders)}), "
            f"tokenizers and VAE come from a diffusers {kind.label} model folder, and {where}. Put one (all its "
            f"parts, the transformer may be left out) at models/configs/{family}, e.g. `hf download "
            f"{REFERENCE_REPOS[family]} --exclude 'transformer/*' --local-dir models/configs/{family}`")
    quiet_local_loading()
    try:
        convert_transformer_file(path, family, companion, target)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{path.name} could not be read as a {kind.label} transformer: "
                              f"{' '.join(str(exc).split())[:400]}") from exc


def _label(family: str) -> str:
    from core.base.families import get_family

    return get_family(family).label


def _convert(path: Path, family: str, config: str, target: Path, offline: bool) -> None:
    import diffusers

    from core.fsutil import new_folder
    from core.quiet import quiet_local_loading

    cls = diffusers.StableDiffusionXLPipeline if family == "sdxl" else diffusers.StableDiffusionPipeline
    extra = {} if family == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    quiet_local_loading()
    try:
        pipe = cls.from_single_file(str(path), config=config, local_files_only=offline, **extra)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{path.name} could not be converted with the {_label(family)} configs from "
                              f"{config}: {' '.join(str(exc).split())[:400]}") from exc
    markers = set(_keys(path)) & {"v_pred", "ztsnr"}
    if "v_pred" in markers:  # how A1111 and ComfyUI mark a v-prediction SDXL checkpoint
        pipe.scheduler.register_to_config(prediction_type="v_prediction")
    if "ztsnr" in markers:  # ... and one trained with zero terminal SNR
        pipe.scheduler.register_to_config(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    target.parent.mkdir(parents=True, exist_ok=True)
    with new_folder(target) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (Path(tmp) / "converted_from.json").write_text(
            json.dumps({"file": str(path), "family": family, "config": config}, indent=2), encoding="utf-8")
