"""Merging a LoRA into its base model and saving one single-file checkpoint (A1111 / ComfyUI layout).

``merge(model, lora, scale, out)`` loads the base model in fp32, loads the
LoRA through diffusers' own loader (so any kohya or diffusers file merges as
it would load), fuses it into the weights at ``scale``, removes the adapter
and writes the result with ``core.lora.single_file`` -- which this app's own
single-file loader reads back (tested: the merged file gives the image of
base + LoRA at that strength).
"""

from __future__ import annotations

from pathlib import Path

import torch

from core.precision import NAMES, torch_dtype


def merge(model: str, lora: str | Path, scale: float, out: str | Path, precision: str = "fp16",
          revision: str = "") -> Path:
    """Write ``model`` with ``lora`` fused in at ``scale`` to ``out`` (.safetensors) and return its path."""
    from core.base.families import detect_family
    from core.base.models import resolve_model_path
    from core.base.sample import load_pipeline
    from core.lora.single_file import save_single_file

    lora = Path(lora)
    if not lora.is_file():
        raise FileNotFoundError(f"LoRA file {lora} does not exist")
    if precision not in NAMES:
        raise ValueError(f"precision {precision!r}: choose one of {', '.join(NAMES)}")
    folder = resolve_model_path(model, revision)
    family = detect_family(folder)
    pipe = load_pipeline(str(folder), device="cpu", dtype=torch.float32)  # fuse in fp32, round once when saving
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="merge")
    pipe.fuse_lora(lora_scale=scale, adapter_names=["merge"])
    pipe.unload_lora_weights()
    encoders = [getattr(pipe, name) for name in family.text_encoders]
    metadata = {"modelspec.title": Path(out).stem, "modelspec.architecture": _architecture(family),
                "lora_studio.merged_lora": lora.name, "lora_studio.merged_scale": f"{scale:g}",
                "lora_studio.base_model": folder.name}
    return save_single_file(out, pipe.unet, pipe.vae, encoders, family.name, torch_dtype(precision), metadata)


def _architecture(family) -> str:
    return family.architecture("epsilon", family.native_resolution).removesuffix("/lora")
