"""LoRA files of the flow families in the layout sd-scripts writes: the original models' module names.

The engine trains on diffusers' transformers, whose attention has separate q,
k and v projections. The original models (Black Forest Labs' FLUX, Stability's
MMDiT), which sd-scripts trains and ComfyUI and Forge run, fuse them: a FLUX
double block's ``img_attn.qkv`` is q, k and v of the picture stream stacked,
a single block's ``linear1`` is q, k, v and the MLP's input stacked, an SD 3.5
joint block's ``x_block.attn.qkv`` likewise. Forge maps only these names for
SD 3.5 (and rejects a LoRA with more than 12 keys it cannot place); ComfyUI
and Forge map them for FLUX, and diffusers' FLUX reader converts them.

A LoRA on a fused layer is written as sd-scripts writes its split-qkv LoRAs:
the parts' down matrices stacked (rank = the sum of the parts' ranks) and
their up matrices block-diagonal, so ``up @ down`` is exactly the parts'
updates stacked, with zero rows for a part that has no LoRA. Unlike
sd-scripts (whose fused files load at a third of their strength), the alpha
keeps ``alpha / rank`` equal to the trained scale. A reader that knows the
layout (diffusers' for FLUX, ``core.base.flow_names.for_diffusers`` for both)
sees the block-diagonal up matrix and splits it back into the separate
projections exactly. The names themselves are in ``core.base.flow_names``.

Two layers store (scale, shift) where diffusers stores (shift, scale): SD
3.5's last ``context_block.adaLN_modulation.1`` (and the final layers, which
are never trained here); their up rows are swapped on the way.
"""

from __future__ import annotations

import torch

from core.base.flow_names import LAYOUTS, depth_of, kohya_key, parts_of, swap_halves


def export(family: str, layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]], denoiser,
           dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """sd-scripts' tensors for the trained layers of a flow transformer.

    ``layers`` maps a diffusers module path to (down, up, alpha) as trained
    (peft's lora_A, lora_B, and the alpha whose ``alpha / rank`` is the
    scale); ``denoiser`` gives the output sizes of untrained parts.
    """
    layout, depth = LAYOUTS[family], depth_of(denoiser)
    groups: dict[str, dict[int | None, tuple]] = {}
    for path, factors in layers.items():
        original, part = layout.original_name(path, depth)
        groups.setdefault(original, {})[part] = factors
    out: dict[str, torch.Tensor] = {}
    sizes = {path: m.out_features for path, m in denoiser.named_modules() if isinstance(m, torch.nn.Linear)}
    for original, parts in groups.items():
        if None in parts:  # a layer that is the same in both models
            down, up, alpha = parts[None]
            up = swap_halves(up) if layout.swapped(original, depth) else up
            out.update(_triple(kohya_key(original), down, up, alpha, dtype))
            continue
        block = layout.diffusers_block(original)
        scales = {alpha / down.shape[0] for down, _, alpha in parts.values()}
        same = len(scales) == 1  # the usual case: the scale stays in alpha, the matrices as trained
        downs, blocks = [], []
        for index, name in enumerate(parts_of(layout, original)):
            rows = sizes[block + name].__index__() if (block + name) in sizes else _base_rows(denoiser, block + name)
            if index in parts:
                down, up, alpha = parts[index]
                downs.append(down.float())
                blocks.append((rows, up.float() if same else up.float() * (alpha / down.shape[0])))
            else:
                blocks.append((rows, None))
        rank = sum(d.shape[0] for d in downs)
        fused_up = torch.zeros(sum(rows for rows, _ in blocks), rank)
        row = col = 0
        for rows, up in blocks:
            if up is not None:
                fused_up[row:row + rows, col:col + up.shape[1]] = up
                col += up.shape[1]
            row += rows
        alpha = scales.pop() * rank if same else float(rank)  # alpha / rank = the parts' scale
        out.update(_triple(kohya_key(original), torch.cat(downs), fused_up, alpha, dtype))
    return out


def _base_rows(denoiser, path: str) -> int:
    module = denoiser.get_submodule(path)
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    return base.out_features


def _triple(key: str, down, up, alpha: float, dtype) -> dict[str, torch.Tensor]:
    return {f"{key}.lora_down.weight": down.detach().to("cpu", dtype).contiguous(),
            f"{key}.lora_up.weight": up.detach().to("cpu", dtype).contiguous(),
            f"{key}.alpha": torch.tensor(float(alpha), dtype=torch.float32)}


def module_index(family: str, denoiser) -> dict[str, torch.nn.Module]:
    """Every linear layer of the transformer blocks under its name in this layout; a fused layer as a
    stand-in ``nn.Linear`` (on the meta device) with the stacked output size, for the file checks."""
    layout, depth = LAYOUTS[family], depth_of(denoiser)
    fused: dict[str, list] = {}
    for path, module in denoiser.named_modules():
        if not isinstance(module, torch.nn.Linear) or "lora_" in path:
            continue
        path = path.removesuffix(".base_layer")
        try:
            original, part = layout.original_name(path, depth)
        except ValueError:
            continue
        fused.setdefault(original, []).append(module)
    index = {}
    for original, modules in fused.items():
        if len(modules) == 1 and not parts_of(layout, original):
            index[kohya_key(original)] = modules[0]
        else:
            index[kohya_key(original)] = torch.nn.Linear(modules[0].in_features,
                                                         sum(m.out_features for m in modules), device="meta")
    return index
