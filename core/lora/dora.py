"""DoRA (``lora.dora``): weight-decomposed LoRA, decomposed along the weight's input axis, as its readers apply it.

DoRA splits the adapted weight ``W + dW`` into a direction and a magnitude
and trains the magnitude too. A file holds it as the module's LoRA plus a
``dora_scale``; A1111, Forge and ComfyUI all read that scale per input column
(shape ``(1, in)``, ``(1, in, 1, 1)`` for a convolution) and apply

    W' = (W + dW) * dora_scale / ||W + dW||      (the norm of each input column over the outputs)

ComfyUI alone also reads a per-output scale, but then divides by the norm of
``W`` instead of ``W + dW``, and A1111 reads none: so the app trains the input
axis, which every reader applies the same way. (peft's ``use_dora`` decomposes
along the output axis, which no reader reproduces, so it is not used.)

Scaling each input column of ``W + dW`` by ``m / n`` is scaling the layer's
input by ``m / n``: a forward pre-hook on peft's LoRA layer does that, with the
norm detached as the DoRA paper and peft do (it saves the memory of its
gradient). The magnitude lives on the layer as ``lora_dora_scale`` (a
``ParameterDict`` per adapter, like peft's own), so peft's state-dict helpers
save and restore it with the rest of the adapter.
"""

from __future__ import annotations

import torch

ATTR = "lora_dora_scale"
_EPS = 1e-8


def column_norms(weight: torch.Tensor) -> torch.Tensor:
    """The norm of each input column (convolution: input channel) over the outputs and the kernel."""
    return weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)


def lora_delta(layer, adapter: str) -> torch.Tensor:
    """``scaling * up @ down`` of one peft LoRA layer, shaped like its base weight (float32)."""
    base = layer.get_base_layer()
    down, up = layer.lora_A[adapter].weight.float(), layer.lora_B[adapter].weight.float()
    shape = base.weight.shape
    return (up.flatten(1) @ down.flatten(1)).reshape(shape) * layer.scaling[adapter]


def base_weight(layer) -> torch.Tensor:
    from peft.utils.integrations import dequantize_module_weight

    return dequantize_module_weight(layer.get_base_layer()).float()


def dora_layers(model, adapter: str | None = None) -> list[tuple[str, object]]:
    """(path, layer) of the LoRA layers that carry a DoRA magnitude (for ``adapter``, when given)."""
    return [(path, m) for path, m in model.named_modules()
            if isinstance(getattr(m, ATTR, None), torch.nn.ParameterDict) and (adapter is None or adapter in
                                                                                getattr(m, ATTR))]


def add_dora(model, adapter: str = "default", magnitudes: dict[str, torch.Tensor] | None = None
             ) -> list[torch.nn.Parameter]:
    """Give every LoRA layer of ``adapter`` in ``model`` a trainable magnitude per input column: ``||W + dW||``
    (so the layer starts as its LoRA alone), or ``magnitudes[path]`` (a file's dora_scale). Returns them."""
    from peft.tuners.lora import LoraLayer

    params = []
    for path, layer in model.named_modules():
        if not isinstance(layer, LoraLayer) or adapter not in layer.lora_A:
            continue
        with torch.no_grad():
            start = (magnitudes[path].reshape(-1) if magnitudes is not None
                     else column_norms(base_weight(layer) + lora_delta(layer, adapter)))
        if not isinstance(getattr(layer, ATTR, None), torch.nn.ParameterDict):
            setattr(layer, ATTR, torch.nn.ParameterDict())
            layer.register_forward_pre_hook(_scale_input)
        weight = layer.lora_A[adapter].weight
        getattr(layer, ATTR)[adapter] = torch.nn.Parameter(start.to(weight.device, torch.float32).clone())
        params.append(getattr(layer, ATTR)[adapter])
    if magnitudes is not None and not params:
        raise ValueError("the file's DoRA scales match no LoRA layer")
    return params


def _active(layer) -> str | None:
    if layer.disable_adapters or getattr(layer, "merged", False):
        return None
    return next((a for a in layer.active_adapters if a in getattr(layer, ATTR)), None)


def _scale_input(layer, args):
    adapter = _active(layer)
    if adapter is None or not layer.scaling[adapter]:  # strength 0: the base model
        return None
    x = args[0]
    with torch.no_grad():
        norms = column_norms(base_weight(layer) + lora_delta(layer, adapter))
    scale = getattr(layer, ATTR)[adapter] / (norms + _EPS)
    scale = scale.view(1, -1, 1, 1) if x.dim() == 4 and isinstance(layer.get_base_layer(), torch.nn.Conv2d) else scale
    return (x * scale.to(x.dtype), *args[1:])


def scale_tensor(layer, adapter: str) -> torch.Tensor:
    """The file's ``dora_scale`` of one layer: (1, in), or (1, in, 1, 1) for a convolution."""
    magnitude = getattr(layer, ATTR)[adapter].detach()
    conv = isinstance(layer.get_base_layer(), torch.nn.Conv2d)
    return magnitude.view(1, -1, 1, 1) if conv else magnitude.view(1, -1)


def fuse(model, adapter: str, strength: float = 1.0) -> int:
    """Write every LoRA layer of ``adapter`` into its base weight as the readers do at ``strength``: a DoRA one
    as ``W + strength * (W' - W)``, a plain one as ``W + strength * dW``; returns how many. The adapter itself
    stays until it is unloaded."""
    from peft.tuners.lora import LoraLayer

    count = 0
    for _, layer in model.named_modules():
        if not isinstance(layer, LoraLayer) or adapter not in layer.lora_A:
            continue
        base = layer.get_base_layer()
        with torch.no_grad():
            weight = base.weight.float()
            adapted = weight + lora_delta(layer, adapter)
            final = adapted
            if adapter in getattr(layer, ATTR, {}):
                scale = getattr(layer, ATTR)[adapter].float() / (column_norms(adapted) + _EPS)
                final = adapted * scale.view(1, -1, *([1] * (weight.dim() - 2)))
            base.weight.copy_((weight + strength * (final - weight)).to(base.weight.dtype))
        count += 1
    return count
