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
    from core.base.models import native_resolution, resolve_model_path
    from core.base.sample import load_pipeline
    from core.lora.preview import apply_lora
    from core.lora.single_file import save_single_file

    lora = Path(lora)
    if not lora.is_file():
        raise FileNotFoundError(f"LoRA file {lora} does not exist")
    if precision not in NAMES:
        raise ValueError(f"precision {precision!r}: choose one of {', '.join(NAMES)}")
    folder = resolve_model_path(model, revision)
    family = detect_family(folder)
    pipe = load_pipeline(str(folder), device="cpu", dtype=torch.float32)  # fuse in fp32, round once when saving
    if family.flow:
        from safetensors import safe_open

        with safe_open(str(lora), "pt") as f:
            if any(k.startswith(("lora_te", "text_encoder")) for k in f.keys()):
                raise ValueError(f"{lora.name} also trains the {family.label} CLIP text encoder, and a merged "
                                 f"{family.label} model is the transformer alone (the file people share and "
                                 f"ComfyUI's diffusion-model loader reads): the text part would be lost. Use the "
                                 f"LoRA file as it is, or train with lora.train_text_encoder = false to merge")
    apply_lora(pipe, lora, 1.0, adapter_name="merge")  # read as the Prompt tab reads it, every layout included
    from core.lora.dora import dora_layers, fuse

    parts = [getattr(pipe, name) for name in (family.denoiser, *family.text_encoders)]
    if any(dora_layers(part, "merge") for part in parts):  # as the readers blend it: W + scale * (W' - W)
        for part in parts:
            fuse(part, "merge", scale)
    else:
        pipe.fuse_lora(lora_scale=scale, adapter_names=["merge"])
    pipe.unload_lora_weights()
    denoiser = getattr(pipe, family.denoiser)
    prediction = pipe.scheduler.config.get("prediction_type", "epsilon") if not family.flow else "flow"
    resolution = native_resolution(folder) or family.native_resolution
    metadata = {"modelspec.title": Path(out).stem,
                "modelspec.architecture": _architecture(family, prediction, resolution,
                                                        family.variant(denoiser.config, folder)),
                "lora_studio.merged_lora": lora.name, "lora_studio.merged_scale": f"{scale:g}",
                "lora_studio.base_model": folder.name}
    if family.flow:  # the transformer alone, in the original model's names: the file FLUX/SD 3.5 users share
        from core.base.flow_checkpoint import original_state_dict
        from core.fsutil import save_safetensors

        out = Path(out)
        if out.suffix.lower() != ".safetensors":
            raise ValueError(f"{out.name}: merged models are written as .safetensors; use that suffix")
        save_safetensors(out, original_state_dict(denoiser, family.name, torch_dtype(precision)), metadata,
                         durable=True)
        return out
    encoders = [getattr(pipe, name) for name in family.text_encoders]
    zero_snr = bool(pipe.scheduler.config.get("rescale_betas_zero_snr", False))
    return save_single_file(out, pipe.unet, pipe.vae, encoders, family.name, torch_dtype(precision), metadata,
                            prediction_type=prediction, zero_snr=zero_snr)


def _architecture(family, prediction_type: str, resolution: int, variant: str = "") -> str:
    """``modelspec.architecture`` of the merged model: by its real prediction type and size (an SD 2.x 768-v
    model is "stable-diffusion-v2-768-v", not "-512")."""
    return family.architecture(prediction_type, resolution, variant).removesuffix("/lora")
