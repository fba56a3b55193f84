"""Module names of the flow transformers in their original models, and reading LoRA files written in them.

diffusers' SD 3.5 and FLUX.1 transformers have separate q, k and v
projections; the original models (Stability's MMDiT, Black Forest Labs'
FLUX), which sd-scripts trains and ComfyUI and Forge run, fuse them, and name
everything differently. ``LAYOUTS`` holds the correspondence of every linear
layer in the blocks (the part's position in a fused layer included); the
LoRA writer (``core.lora.fused_layout``) and the single-file reader and
writer (``core.base.flow_checkpoint``) use it.

``for_diffusers`` reads a LoRA file in these names for a diffusers pipeline
(diffusers' SD 3.5 loader has no converter, and its FLUX one assumes FLUX.1's
widths): a fused layer's block-diagonal up matrix splits back into the parts'
own ranks.

Two layers store (scale, shift) where diffusers stores (shift, scale): SD
3.5's last ``context_block.adaLN_modulation.1`` and the final layers.
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

_FLUX2_DOUBLE = {
    **_attention("attn.to_q", "attn.to_k", "attn.to_v", "img_attn.qkv"),
    **_attention("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "txt_attn.qkv"),
    "attn.to_out.0": ("img_attn.proj", None), "attn.to_add_out": ("txt_attn.proj", None),
    "ff.linear_in": ("img_mlp.0", None), "ff.linear_out": ("img_mlp.2", None),
    "ff_context.linear_in": ("txt_mlp.0", None), "ff_context.linear_out": ("txt_mlp.2", None),
}
# FLUX.2's single blocks already fuse q, k, v and the MLP input in one diffusers layer.
_FLUX2_SINGLE = {"attn.to_qkv_mlp_proj": ("linear1", None), "attn.to_out": ("linear2", None)}
# Z-Image's original (Lumina-2 style) blocks: the same in its main layers and both refiners.
_ZIMAGE_BLOCK = {
    **_attention("attention.to_q", "attention.to_k", "attention.to_v", "attention.qkv"),
    "attention.to_out.0": ("attention.out", None),
    "feed_forward.w1": ("feed_forward.w1", None), "feed_forward.w2": ("feed_forward.w2", None),
    "feed_forward.w3": ("feed_forward.w3", None), "adaLN_modulation.0": ("adaLN_modulation.0", None),
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
    "flux2": Layout({"transformer_blocks": ("double_blocks", _FLUX2_DOUBLE),
                     "single_transformer_blocks": ("single_blocks", _FLUX2_SINGLE)},
                    {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                     "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}),
    "zimage": Layout({name: (name, _ZIMAGE_BLOCK) for name in ("layers", "noise_refiner", "context_refiner")},
                     {"attention.qkv": ("attention.to_q", "attention.to_k", "attention.to_v")}),
}


def kohya_key(original: str) -> str:
    return PREFIX + original.replace(".", "_")


def parts_of(layout: Layout, original: str) -> tuple[str, ...]:
    return layout.parts.get(original.split(".", 2)[2], ())


def swap_halves(up: torch.Tensor) -> torch.Tensor:
    half = up.shape[0] // 2
    return torch.cat([up[half:], up[:half]])


def depth_of(denoiser) -> int:
    """Blocks of the double (joint) stream: where SD 3.5's last block differs."""
    return len(getattr(denoiser, "transformer_blocks", ()))


def kohya_module_name(prefix: str, path: str, model: torch.nn.Module) -> str:
    """``lora_unet_`` + module path with dots as underscores.

    transformers 5 flattened ``CLIPTextModel`` (no ``text_model`` submodule), so
    its paths start at ``encoder.``; kohya and A1111 keys keep the original
    ``text_model_encoder_...`` spelling, which is restored here.
    """
    flattened = prefix.startswith("lora_te") and not hasattr(model, "text_model")
    if flattened and path.split(".")[0] in ("encoder", "embeddings", "final_layer_norm"):
        path = "text_model." + path
    return prefix + path.replace(".", "_")


def to_peft(family: str, tensors: dict[str, torch.Tensor], denoiser) -> dict[str, torch.Tensor]:
    """A file of this layout as diffusers' peft layout (``transformer.<path>.lora_A/B.weight``), with each
    module's scale folded into its up matrix: what ``load_lora_weights`` of the family's pipeline reads.

    A fused layer's up matrix that is block-diagonal (as written here and by sd-scripts) splits into the parts'
    own ranks; any other keeps the whole down for each part (exact too, at the fused rank)."""
    layout, depth = LAYOUTS[family], depth_of(denoiser)
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
            up = swap_halves(up) if layout.swapped(original, depth) else up
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
