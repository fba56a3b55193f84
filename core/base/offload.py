"""Group offloading of a frozen UNet for training: the weights of its linear layers live in system RAM and
each comes to the GPU only while its layer runs (diffusers' ``apply_group_offloading``, one group per layer).

Only linear layers, because of what the backward pass reads. Offloading swaps a parameter's data after the
layer's forward. A linear layer's backward uses the copy of the weight autograd saved, so its gradients are
right; the backward of a convolution or a GroupNorm/LayerNorm reads the parameter's data again, which by then
is the offloaded (CPU, or emptied) tensor: wrong gradients or a device error
(``tests/test_memory.py::test_offloaded_layers_give_their_gradients_with_the_weights_gone``). The linear
layers hold most of the weights anyway (SDXL: 2.2 of its 2.6 billion).

With gradient checkpointing the saved copies live only while one checkpointed block (a ResNet or a
transformer block) is recomputed for its backward, so the card holds the convolutions and norms, the linear
layers outside checkpointed blocks, and one block's linear layers at a time. The offloading is applied before
the LoRA is added: peft wraps the offloaded layers, and its own (trainable) layers are in no offload group,
so they stay on the GPU beside their optimizer state.
"""

from __future__ import annotations

import torch


def offload_linears(unet: torch.nn.Module, device, disk_folder: str | None = None) -> int:
    """Keep the weights of ``unet``'s linear layers in system RAM (or files in ``disk_folder``, for machines
    short of RAM), each brought to ``device`` while its layer runs; returns how many layers."""
    from diffusers.hooks import apply_group_offloading

    layers = [(name, m) for name, m in unet.named_modules() if type(m) is torch.nn.Linear]
    for name, layer in layers:
        apply_group_offloading(layer, onload_device=torch.device(device), offload_device=torch.device("cpu"),
                               offload_type="leaf_level",
                               offload_to_disk_path=None if disk_folder is None else f"{disk_folder}/{name}")
    return len(layers)


def trainable_to(model: torch.nn.Module, device) -> None:
    """Put what an offloaded UNet keeps on the card there: everything but the offloaded linear weights
    (``model.to`` would bring those too)."""
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    offloaded = {id(p) for m in model.modules() if type(m) is torch.nn.Linear and _is_group_offload_enabled(m)
                 for p in m.parameters(recurse=False)}
    for tensor in (*model.parameters(), *model.buffers()):
        if id(tensor) not in offloaded:
            tensor.data = tensor.data.to(device)


def resident_weights(unet: torch.nn.Module) -> int:
    """Parameters (count) an offloaded UNet has on the card at once while training with gradient
    checkpointing: all but the linear layers, the linear layers outside checkpointed blocks (their saved
    copies wait for the backward pass), and the biggest checkpointed block's linear layers."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    blocks = [m for m in unet.modules() if isinstance(m, (ResnetBlock2D, BasicTransformerBlock))]
    total = sum(p.numel() for p in unet.parameters())
    in_blocks = [_linear_parameters(block) for block in blocks]
    return total - sum(in_blocks) + max(in_blocks, default=0)


def _linear_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for m in module.modules() if type(m) is torch.nn.Linear for p in m.parameters(recurse=False))
