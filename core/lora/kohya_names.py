"""Module names in kohya LoRA files: diffusers UNet paths -> the original (LDM) names.

kohya's sd-scripts trains SD 1.x/2.x on the diffusers UNet, so its keys keep
diffusers names (``lora_unet_down_blocks_1_attentions_0_...``). For SDXL it
trains on its own copy of the original Stability ("sgm"/LDM) UNet, so keys use
that model's names (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``).
A1111, Forge and ComfyUI match SDXL LoRA keys against those names, so an SDXL
file written with diffusers names loads partly or not at all there.

The LDM UNet is one flat list of blocks, where diffusers nests them::

    input_blocks.0.0                      conv_in
    input_blocks.(1 + i*(L+1) + j).0      down_blocks.i.resnets.j       (j < L)
    input_blocks.(1 + i*(L+1) + j).1      down_blocks.i.attentions.j
    input_blocks.(1 + i*(L+1) + L).0.op   down_blocks.i.downsamplers.0.conv
    middle_block.0 / .1 / .2              mid_block.resnets.0 / attentions.0 / resnets.1
    output_blocks.(i*(L+1) + j).0         up_blocks.i.resnets.j         (j <= L)
    output_blocks.(i*(L+1) + j).1         up_blocks.i.attentions.j
    output_blocks.(i*(L+1) + L).k.conv    up_blocks.i.upsamplers.0.conv (k = 2 after an
                                          attention, else 1: it follows the last layer)
    time_embed.0 / .2                     time_embedding.linear_1 / linear_2
    label_emb.0.0 / .2                    add_embedding (SDXL) or class_embedding linear_1 / linear_2
    out.0 / out.2                         conv_norm_out / conv_out

with L = ``layers_per_block``. Inside a resnet the layers are renamed (see
``_RESNET``); inside an attention block (a ``Transformer2DModel``) the names
are the same in both models. Everything is derived from the UNet config, so
any SD-shaped UNet (SD 1.x, 2.x, SDXL, tiny test models) maps; a path with no
LDM counterpart raises ValueError.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

UNET_PREFIX = "lora_unet_"

# diffusers ResnetBlock2D layer -> LDM ResBlock layer (in_layers = norm, SiLU, conv;
# emb_layers = SiLU, Linear; out_layers = norm, SiLU, dropout, conv).
_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}

# Layers of a Transformer2DModel that exist under the same name in LDM's
# SpatialTransformer. Anything else (a fused ``to_qkv``, added norms) has no
# place in an LDM checkpoint, so it is refused rather than written under a
# name no loader knows.
_ATTENTION_LAYER = re.compile(
    r"(norm|proj_in|proj_out"
    r"|transformer_blocks\.\d+\.(norm[123]|attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2))"
)

_PLAIN_DOWN, _ATTN_DOWN = "DownBlock2D", "CrossAttnDownBlock2D"
_PLAIN_UP, _ATTN_UP = "UpBlock2D", "CrossAttnUpBlock2D"
_MID = "UNetMidBlock2DCrossAttn"


def _get(config, key: str, default=None):
    """Read ``key`` from a diffusers config (FrozenDict), a dict or an object with attributes."""
    if isinstance(config, dict):
        return config.get(key, default)
    return getattr(config, key, default)


@dataclass(frozen=True)
class _Layout:
    """The parts of a UNet config that decide LDM block numbers."""

    layers: int  # L: resnets per down block (up blocks have L + 1)
    down_attention: tuple[bool, ...]  # per down block: has attentions
    up_attention: tuple[bool, ...]  # per up block: has attentions
    embeddings: dict  # diffusers top-level module -> LDM name

    @classmethod
    def of(cls, config) -> _Layout:
        down = tuple(_get(config, "down_block_types") or ())
        up = tuple(_get(config, "up_block_types") or ())
        where = "UNet config"
        for kind, types, allowed in (("down", down, (_PLAIN_DOWN, _ATTN_DOWN)), ("up", up, (_PLAIN_UP, _ATTN_UP))):
            odd = [t for t in types if t not in allowed]
            if odd:
                raise ValueError(
                    f"{where}: {kind} block type(s) {', '.join(odd)} have no original (LDM) Stable Diffusion "
                    f"counterpart; LDM names exist only for UNets built from {' / '.join(allowed)}."
                )
        if not down or len(down) != len(up):
            raise ValueError(f"{where}: expected as many up blocks as down blocks, got {len(down)} and {len(up)}")
        mid = _get(config, "mid_block_type", _MID) or _MID
        if mid != _MID:
            raise ValueError(f"{where}: mid_block_type {mid!r} has no LDM counterpart (only {_MID} does)")
        return cls(_layers(_get(config, "layers_per_block", 2), len(down)),
                   tuple(t == _ATTN_DOWN for t in down), tuple(t == _ATTN_UP for t in up), _embeddings(config))

    @property
    def blocks(self) -> int:
        return len(self.down_attention)


def _layers(value, blocks: int) -> int:
    """``layers_per_block`` as one int; per-block lists only when all entries agree."""
    if isinstance(value, int):
        return value
    values = set(value)
    if len(values) != 1 or len(value) != blocks:
        raise ValueError(
            f"UNet config: layers_per_block={list(value)} is not one value for all {blocks} blocks; kohya/LDM "
            "block numbering (and the loaders that read it) assume the same number of layers in every block."
        )
    return values.pop()


def _embeddings(config) -> dict[str, str]:
    """Top-level layers outside the block lists, for this config."""
    names = {
        "conv_in": "input_blocks.0.0",
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    # SDXL's size/crop + pooled-text MLP and SD's class-conditioning MLP are both
    # the LDM model's label_emb; a UNet has at most one of them.
    if _get(config, "addition_embed_type") == "text_time":
        names.update({"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"})
    elif _get(config, "class_embed_type") in ("timestep", "projection"):
        names.update({"class_embedding.linear_1": "label_emb.0.0", "class_embedding.linear_2": "label_emb.0.2"})
    return names


def _index(text: str, limit: int, what: str) -> int:
    if not text.isdigit() or int(text) >= limit:
        raise ValueError(f"{what} index {text!r} is out of range (this UNet has {limit})")
    return int(text)


def _inner(kind: str, rest: list[str]) -> str:
    """The layer path inside one resnet / attention block, in LDM spelling."""
    inner = ".".join(rest)
    if kind == "resnets":
        if inner and inner not in _RESNET:
            raise ValueError(f"resnet layer {inner!r} has no LDM counterpart (known: {', '.join(_RESNET)})")
        return _RESNET.get(inner, "")
    if inner and not _ATTENTION_LAYER.fullmatch(inner):
        raise ValueError(f"attention layer {inner!r} has no LDM counterpart")
    return inner


def _join(*parts) -> str:
    return ".".join(str(p) for p in parts if p != "")


def _down(layout: _Layout, parts: list[str]) -> str:
    i = _index(parts[1], layout.blocks, "down block")
    first = 1 + i * (layout.layers + 1)  # input_blocks.0 is conv_in
    kind = parts[2] if len(parts) > 2 else ""
    if kind == "downsamplers":
        if i == layout.blocks - 1:
            raise ValueError("the last down block has no downsampler")
        if parts[3:] not in (["0"], ["0", "conv"]):
            raise ValueError("expected downsamplers.0.conv")
        return _join("input_blocks", first + layout.layers, 0, "op" if len(parts) == 5 else "")
    if kind == "attentions" and not layout.down_attention[i]:
        raise ValueError(f"down block {i} has no attentions")
    if kind not in ("resnets", "attentions") or len(parts) < 4:
        raise ValueError("expected resnets.J, attentions.J or downsamplers.0 after down_blocks.I")
    j = _index(parts[3], layout.layers, f"down block {i} {kind}")
    return _join("input_blocks", first + j, 0 if kind == "resnets" else 1, _inner(kind, parts[4:]))


def _up(layout: _Layout, parts: list[str]) -> str:
    i = _index(parts[1], layout.blocks, "up block")
    first = i * (layout.layers + 1)
    kind = parts[2] if len(parts) > 2 else ""
    if kind == "upsamplers":
        if i == layout.blocks - 1:
            raise ValueError("the last up block has no upsampler")
        if parts[3:] not in (["0"], ["0", "conv"]):
            raise ValueError("expected upsamplers.0.conv")
        # The upsampler sits in the block's last layer, after its resnet (0) and attention (1).
        slot = 2 if layout.up_attention[i] else 1
        return _join("output_blocks", first + layout.layers, slot, "conv" if len(parts) == 5 else "")
    if kind == "attentions" and not layout.up_attention[i]:
        raise ValueError(f"up block {i} has no attentions")
    if kind not in ("resnets", "attentions") or len(parts) < 4:
        raise ValueError("expected resnets.J, attentions.J or upsamplers.0 after up_blocks.I")
    j = _index(parts[3], layout.layers + 1, f"up block {i} {kind}")
    return _join("output_blocks", first + j, 0 if kind == "resnets" else 1, _inner(kind, parts[4:]))


def _mid(parts: list[str]) -> str:
    kind = parts[1] if len(parts) > 1 else ""
    if kind not in ("resnets", "attentions") or len(parts) < 3:
        raise ValueError("expected resnets.J or attentions.0 after mid_block")
    j = _index(parts[2], 2 if kind == "resnets" else 1, f"mid block {kind}")
    # middle_block is resnet, attention, resnet
    return _join("middle_block", 2 * j if kind == "resnets" else 1, _inner(kind, parts[3:]))


def ldm_unet_path(path: str, unet_config) -> str:
    """The original (LDM/sgm) module path of the diffusers UNet module ``path``.

    ``unet_config`` is the ``UNet2DConditionModel``'s config (``unet.config``
    or a plain dict). Example, for SDXL:
    ``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`` ->
    ``input_blocks.4.1.transformer_blocks.0.attn1.to_q``.

    Raises ValueError naming the path when it has no LDM counterpart: a block
    or layer index this UNet does not have, a layer the LDM UNet lacks (fused
    ``to_qkv``, ``encoder_hid_proj``, ...), or a UNet whose block types are
    not the Stable Diffusion ones.
    """
    layout = _Layout.of(unet_config)
    parts = path.split(".")
    try:
        if path in layout.embeddings:
            return layout.embeddings[path]
        if parts[0] == "down_blocks" and len(parts) > 1:
            return _down(layout, parts)
        if parts[0] == "up_blocks" and len(parts) > 1:
            return _up(layout, parts)
        if parts[0] == "mid_block":
            return _mid(parts)
        raise ValueError("not a layer of the Stable Diffusion UNet layout")
    except ValueError as exc:
        raise ValueError(f"Cannot give UNet module {path!r} an original (LDM) name: {exc}.") from None


def kohya_unet_key(path: str, unet_config, ldm: bool) -> str:
    """The kohya LoRA module name (``lora_unet_...``) of the diffusers UNet module ``path``.

    ``ldm=True`` uses the original LDM names, as sd-scripts writes for SDXL;
    ``ldm=False`` keeps diffusers names, as it writes for SD 1.x/2.x. Dots
    become underscores either way (the part before ``.lora_down.weight``).
    """
    name = ldm_unet_path(path, unet_config) if ldm else path
    return UNET_PREFIX + name.replace(".", "_")
