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
layout (diffusers' for FLUX, ``to_peft`` here for both) sees the
block-diagonal up matrix and splits it back into the separate projections
exactly.

Two layers store (scale, shift) where diffusers stores (shift, scale): SD
3.5's last ``context_block.adaLN_modulation.1`` (and the final layers, which
are never trained here); their up rows are swapped on the way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

PREFIX = "lora_unet_"


@dataclass(frozen=True)
class Layout:
    blocks: dict[str, tuple[str, dict[str, tuple[str, int | None]]]]  # diffusers block list -> original, table
    parts: dict[str, tuple[str, ...]]  # fused original layer (in a block) -> diffusers layers, stacked in order
    swapped_in_last: tuple[str, ...] = ()  # original layers stored (scale, shift) in the last block

    def original_name(self, path: str, depth: int) -> tuple[str, int | None]:
        """(original module name, position of the part in a fused layer or None) of a diffusers path; ValueError
        for a layer outside the blocks, which no tool of this layout can place."""
        match = re.fullmatch(r"([a-z_]+)\.(\d+)\.(.+)", path)
        entry = self.blocks.get(match.group(1)) if match else None
        if entry is None or match.group(3) not in entry[1]:
            raise ValueError(f"module {path!r} has no place in sd-scripts' LoRA layout (only the linear layers of "
                             f"the transformer blocks do)")
        name, part = entry[1][match.group(3)]
        return f"{entry[0]}.{match.group(2)}.{name}", part

    def swapped(self, original: str, depth: int) -> bool:
        kind, number, name = original.split(".", 2)
        return name in self.swapped_in_last and int(number) == depth - 1

    def diffusers_block(self, original: str) -> str:
        kind, number = original.split(".")[:2]
        block = next(b for b, (o, _) in self.blocks.items() if o == kind)
        return f"{block}.{number}."


def _attention(q: str, k: str, v: str, fused: str) -> dict[str, tuple[str, int]]:
    return {q: (fused, 0), k: (fused, 1), v: (fused, 2)}


_FLUX_DOUBLE = {
    **_attention("attn.to_q", "attn.to_k", "attn.to_v", "img_attn.qkv"),
    **_attention("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "txt_attn.qkv"),
    "attn.to_out.0": ("img_attn.proj", None), "attn.to_add_out": ("txt_attn.proj", None),
    "ff.net.0.proj": ("img_mlp.0", None), "ff.net.2": ("img_mlp.2", None),
    "ff_context.net.0.proj": ("txt_mlp.0", None), "ff_context.net.2": ("txt_mlp.2", None),
    "norm1.linear": ("img_mod.lin", None), "norm1_context.linear": ("txt_mod.lin", None),
}
_FLUX_SINGLE = {
    **_attention("attn.to_q", "attn.to_k", "attn.to_v", "linear1"), "proj_mlp": ("linear1", 3),
    "proj_out": ("linear2", None), "norm.linear": ("modulation.lin", None),
}
_SD3_JOINT = {
    **_attention("attn.to_q", "attn.to_k", "attn.to_v", "x_block.attn.qkv"),
    **_attention("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "context_block.attn.qkv"),
    **_attention("attn2.to_q", "attn2.to_k", "attn2.to_v", "x_block.attn2.qkv"),
    "attn.to_out.0": ("x_block.attn.proj", None), "attn.to_add_out": ("context_block.attn.proj", None),
    "attn2.to_out.0": ("x_block.attn2.proj", None),
    "ff.net.0.proj": ("x_block.mlp.fc1", None), "ff.net.2": ("x_block.mlp.fc2", None),
    "ff_context.net.0.proj": ("context_block.mlp.fc1", None), "ff_context.net.2": ("context_block.mlp.fc2", None),
    "norm1.linear": ("x_block.adaLN_modulation.1", None),
    "norm1_context.linear": ("context_block.adaLN_modulation.1", None),
}

LAYOUTS = {
    "flux": Layout({"transformer_blocks": ("double_blocks", _FLUX_DOUBLE),
                    "single_transformer_blocks": ("single_blocks", _FLUX_SINGLE)},
                   {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
                    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}),
    "sd3": Layout({"transformer_blocks": ("joint_blocks", _SD3_JOINT)},
                  {"x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                   "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
                   "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v")},
                  swapped_in_last=("context_block.adaLN_modulation.1",)),
}


def kohya_key(original: str) -> str:
    return PREFIX + original.replace(".", "_")


def _parts(layout: Layout, original: str) -> tuple[str, ...]:
    return layout.parts.get(original.split(".", 2)[2], ())


def _swap_halves(up: torch.Tensor) -> torch.Tensor:
    half = up.shape[0] // 2
    return torch.cat([up[half:], up[:half]])


def export(family: str, layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]], denoiser,
           dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """sd-scripts' tensors for the trained layers of a flow transformer.

    ``layers`` maps a diffusers module path to (down, up, alpha) as trained
    (peft's lora_A, lora_B, and the alpha whose ``alpha / rank`` is the
    scale); ``denoiser`` gives the output sizes of untrained parts.
    """
    layout, depth = LAYOUTS[family], _depth(denoiser)
    groups: dict[str, dict[int | None, tuple]] = {}
    for path, factors in layers.items():
        original, part = layout.original_name(path, depth)
        groups.setdefault(original, {})[part] = factors
    out: dict[str, torch.Tensor] = {}
    sizes = {path: m.out_features for path, m in denoiser.named_modules() if isinstance(m, torch.nn.Linear)}
    for original, parts in groups.items():
        if None in parts:  # a layer that is the same in both models
            down, up, alpha = parts[None]
            up = _swap_halves(up) if layout.swapped(original, depth) else up
            out.update(_triple(kohya_key(original), down, up, alpha, dtype))
            continue
        block = layout.diffusers_block(original)
        scales = {alpha / down.shape[0] for down, _, alpha in parts.values()}
        same = len(scales) == 1  # the usual case: the scale stays in alpha, the matrices as trained
        downs, blocks = [], []
        for index, name in enumerate(_parts(layout, original)):
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


def _depth(denoiser) -> int:
    return len(denoiser.transformer_blocks)


def _triple(key: str, down, up, alpha: float, dtype) -> dict[str, torch.Tensor]:
    return {f"{key}.lora_down.weight": down.detach().to("cpu", dtype).contiguous(),
            f"{key}.lora_up.weight": up.detach().to("cpu", dtype).contiguous(),
            f"{key}.alpha": torch.tensor(float(alpha), dtype=torch.float32)}


def module_index(family: str, denoiser) -> dict[str, torch.nn.Module]:
    """Every linear layer of the transformer blocks under its name in this layout; a fused layer as a
    stand-in ``nn.Linear`` (on the meta device) with the stacked output size, for the file checks."""
    layout, depth = LAYOUTS[family], _depth(denoiser)
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
        if len(modules) == 1 and not _parts(layout, original):
            index[kohya_key(original)] = modules[0]
        else:
            index[kohya_key(original)] = torch.nn.Linear(modules[0].in_features,
                                                         sum(m.out_features for m in modules), device="meta")
    return index


def to_peft(family: str, tensors: dict[str, torch.Tensor], denoiser) -> dict[str, torch.Tensor]:
    """A file of this layout as diffusers' peft layout (``transformer.<path>.lora_A/B.weight``), with each
    module's scale folded into its up matrix: what ``load_lora_weights`` of the family's pipeline reads.

    A fused layer's up matrix that is block-diagonal (as written here and by sd-scripts) splits into the parts'
    own ranks; any other keeps the whole down for each part (exact too, at the fused rank)."""
    layout, depth = LAYOUTS[family], _depth(denoiser)
    by_original = {}
    for path, module in denoiser.named_modules():
        if isinstance(module, torch.nn.Linear) and "lora_" not in path:
            path = path.removesuffix(".base_layer")
            try:
                original, part = layout.original_name(path, depth)
            except ValueError:
                continue
            by_original.setdefault(kohya_key(original), {})[part] = (path, module.out_features)
    out = {}
    for key, parts in by_original.items():
        down, up = tensors.get(f"{key}.lora_down.weight"), tensors.get(f"{key}.lora_up.weight")
        if down is None or up is None:
            continue
        alpha = tensors.get(f"{key}.alpha")
        scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
        up = up.float() * scale
        if None in parts:
            path, _ = parts[None]
            original = path and layout.original_name(path, depth)[0]
            up = _swap_halves(up) if layout.swapped(original, depth) else up
            out[f"transformer.{path}.lora_A.weight"], out[f"transformer.{path}.lora_B.weight"] = down.float(), up
            continue
        order = sorted(parts)
        sizes = [parts[i][1] for i in order]
        pieces = list(torch.split(up, sizes))
        rank = down.shape[0]
        diagonal = rank % len(order) == 0 and all(
            not piece[:, j * (rank // len(order)):(j + 1) * (rank // len(order))].any()
            for i, piece in enumerate(pieces) for j in range(len(order)) if j != i)
        for i, index in enumerate(order):
            path = parts[index][0]
            if diagonal:
                r = rank // len(order)
                part_down, part_up = down[i * r:(i + 1) * r], pieces[i][:, i * r:(i + 1) * r]
            else:
                part_down, part_up = down, pieces[i]
            out[f"transformer.{path}.lora_A.weight"] = part_down.float()
            out[f"transformer.{path}.lora_B.weight"] = part_up.contiguous()
    return out


def for_diffusers(pipe, family: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The state dict diffusers' ``load_lora_weights`` of a flow pipeline reads for a file in this layout; None
    when the file needs none (peft layout already). SD 3.5's loader has no converter of its own and would skip
    every key; FLUX's converter assumes FLUX.1's layer widths (3072), so models of other widths (the tiny test
    models, later variants) need this one, which reads the widths from the pipeline's transformer.
    Text-encoder keys (``lora_te1_``/``lora_te2_``) become ``text_encoder``/``text_encoder_2`` peft keys; every
    scale is folded into the up matrices, as the loaders take no alphas for them."""
    if not any(k.startswith(PREFIX) for k in tensors):
        return None
    out = to_peft(family, tensors, pipe.transformer)
    from core.lora.lora_io import kohya_module_name

    for prefix, name in (("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2")):
        encoder = getattr(pipe, name, None)
        if encoder is None or not any(k.startswith(prefix) for k in tensors):
            continue
        for path, module in encoder.named_modules():
            if not isinstance(module, torch.nn.Linear) or "lora_" in path:
                continue
            path = path.removesuffix(".base_layer")
            key = kohya_module_name(prefix, path, encoder)
            down, up = tensors.get(f"{key}.lora_down.weight"), tensors.get(f"{key}.lora_up.weight")
            if down is None or up is None:
                continue
            alpha = tensors.get(f"{key}.alpha")
            scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
            out[f"{name}.{path}.lora_A.weight"] = down.float()
            out[f"{name}.{path}.lora_B.weight"] = up.float() * scale
    return out
