"""Every layer of a base model under the name a LoRA file gives it, for each layout the app reads and writes."""

from __future__ import annotations

import torch

from core.base.flow_names import kohya_module_name
from core.lora.kohya_names import UNET_PREFIX

# A flow transformer's LoHa/LoKr keeps diffusers' module names (its q, k and v are separate layers there, and a
# Kronecker product cannot be stacked into the original model's fused qkv), under the prefix SimpleTuner's
# LyCORIS files use, which ComfyUI maps for SD 3.5, FLUX.1, FLUX.2 and Z-Image.
LYCORIS_FLOW_PREFIX = "lycoris_"


def module_index(unet, text_encoders, family) -> dict[str, torch.nn.Module]:
    """Every Linear/Conv2d of the UNet and text encoders, keyed by its kohya name for ``family``."""
    index: dict[str, torch.nn.Module] = {}
    config = unet.config
    for path, module in [] if family.flow else _plain_modules(unet):
        if family.ldm_unet_names:
            from core.lora.kohya_names import kohya_unet_key

            try:
                index[kohya_unet_key(path, config, ldm=True)] = module
            except ValueError:
                continue  # a module kohya never trains (e.g. a norm-adjacent projection it cannot name)
        else:
            index[kohya_module_name(UNET_PREFIX, path, unet)] = module
    if family.flow:  # the original model's names, with q, k and v fused (core.lora.fused_layout)
        from core.lora.fused_layout import module_index as fused_index

        index.update(fused_index(family.name, unet))
        index.update({LYCORIS_FLOW_PREFIX + path.replace(".", "_"): module for path, module in _plain_modules(unet)})
    trainable = [e for i, e in enumerate(text_encoders) if i in family.trainable_text]  # never T5
    for prefix, encoder in zip(family.kohya_text_prefixes, trainable, strict=True):
        for path, module in _plain_modules(encoder):
            index[kohya_module_name(prefix + "_", path, encoder)] = module
    return index


def peft_index(unet, text_encoders, family) -> dict[str, torch.nn.Module]:
    """Every Linear/Conv2d keyed as the diffusers/peft layout names it (``unet.``, ``text_encoder.``...)."""
    index = {f"{family.denoiser}.{path}": module for path, module in _plain_modules(unet)}
    for name, encoder in zip(family.text_encoders, text_encoders, strict=True):
        for path, module in _plain_modules(encoder):
            index[f"{name}.{path}"] = module
            if not path.startswith("text_model."):  # files written before transformers 5 flattened CLIP
                index[f"{name}.text_model.{path}"] = module
    return index


def _plain_modules(model):
    """(path, module) of every Linear/Conv2d; a peft-wrapped one under its own path (not ``.base_layer``)."""
    for path, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and "lora_" not in path:
            yield path.removesuffix(".base_layer"), module
