"""The diffusers / peft layout of a LoRA (``pytorch_lora_weights.safetensors``): the optional second output.

The kohya file (``core.lora.lora_io``) is what A1111 and ComfyUI load; this one is
for diffusers scripts, which read peft module names and the adapter's config.
"""

from __future__ import annotations

from pathlib import Path

import torch

from core.lora.lora_io import cpu_copy, strip_wrappers


def save_diffusers_lora(path, unet, text_encoder=None, family: str = "sd1", dtype=torch.float16) -> Path:
    """Write the adapter as diffusers' ``pytorch_lora_weights.safetensors`` (peft names), atomically.

    Each model's peft config (rank, alpha, targets) goes into the file's
    adapter metadata, so ``load_lora_weights`` restores the real alpha (without
    it diffusers assumes alpha = rank). ``text_encoder`` is a CLIPTextModel or
    a ``core.base.text.TextEncoders`` (SDXL's two, saved as text_encoder and
    text_encoder_2).
    """
    import diffusers
    from peft.utils import get_peft_model_state_dict

    from core.base.families import get_family
    from core.fsutil import atomic_path

    kind = get_family(family)
    unet = strip_wrappers(unet)
    layers = {f"{kind.denoiser}_lora_layers": _cast(get_peft_model_state_dict(unet), dtype),
              f"{kind.denoiser}_lora_adapter_metadata": _adapter_metadata(unet)}
    if text_encoder is not None:
        if hasattr(text_encoder, "trainable"):  # TextEncoders: the CLIP ones that carry a LoRA (never T5)
            encoders = text_encoder.trainable()
        else:
            encoders = list(text_encoder.encoders) if hasattr(text_encoder, "encoders") else [text_encoder]
        names = [name for i, name in enumerate(kind.text_encoders) if i in kind.trainable_text]
        for name, encoder in zip(names, encoders, strict=True):
            layers[f"{name}_lora_layers"] = _cast(get_peft_model_state_dict(encoder), dtype)
            layers[f"{name}_lora_adapter_metadata"] = _adapter_metadata(encoder)
    from core.lora.lora_io import NonFiniteWeightsError, nonfinite_counts

    bad = {k: n for key, tensors in layers.items() if key.endswith("_layers")
           for k, n in nonfinite_counts(tensors).items()}
    if bad:
        raise NonFiniteWeightsError(bad)
    pipeline = getattr(diffusers, kind.pipeline_class)
    path = Path(path)
    with atomic_path(path, durable=True) as tmp:
        pipeline.save_lora_weights(str(tmp.parent), weight_name=tmp.name, safe_serialization=True, **layers)
    return path


def _cast(tensors: dict, dtype) -> dict:
    return {k: cpu_copy(v, dtype) for k, v in tensors.items()}


def _adapter_metadata(model) -> dict:
    (config,) = model.peft_config.values()
    return config.to_dict()
