"""A diffusers Stable Diffusion pipeline as one original-format ("single-file") checkpoint.

A1111, Forge and ComfyUI load base models as one ``.safetensors`` file in
the layout of Stability's original code (LDM for SD 1.x/2.x, "sgm" for
SDXL). This module renames and reshapes the weights of a diffusers UNet, VAE
and text encoder(s) into that layout; ``save_single_file`` writes it
atomically. Every rule is the inverse of what diffusers' own reader
(``diffusers.loaders.single_file_utils``) does, and the tests read each file
back with ``from_single_file`` and compare every tensor and a sampled image.

Key layout per family::

    model.diffusion_model.*                     UNet, LDM names (core.lora.kohya_names)
    first_stage_model.*                         VAE (see _vae_name)
    sd1   cond_stage_model.transformer.text_model.*       CLIP, transformers names
    sd2   cond_stage_model.model.*                        OpenCLIP (see _open_clip)
    sdxl  conditioner.embedders.0.transformer.text_model.*  CLIP-L, transformers names
          conditioner.embedders.1.model.*                   OpenCLIP bigG, with text_projection

These prefixes are what the loaders use to tell the families apart: diffusers
(``infer_diffusers_model_type``) and ComfyUI by the UNet's shapes plus the
text-encoder prefixes, A1111 by ``conditioner.embedders.1.model.ln_final.weight``
(SDXL) and a 1024-wide ``cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight``
(SD 2.x), the app itself by ``core.base.checkpoints.checkpoint_family``.

SD 2.x's text encoder: the original OpenCLIP ViT-H has 24 layers, but SD 2.x
conditions on the penultimate one, so diffusers' SD 2.x text encoder stops
after layer 23 (it has no last layer and no ``text_projection``). We write
the layers the model has plus one all-zero layer after them. A zero
residual layer is exactly the identity (its attention and MLP outputs are
zero and are added to the input), so:

* the file has the key set of a real SD 2.x checkpoint (24 blocks), and no
  loader leaves a layer uninitialised or warns that it is missing;
* A1111 conditions on the penultimate layer and never runs the last block
  (and would fill a missing one with zeros anyway: it loads onto the meta
  device and zero-fills whatever the file lacks);
* ComfyUI runs every layer but takes the penultimate output by default; with
  "use the last layer" it now gets ``ln_final`` of the same states, which is
  what diffusers' encoder computes;
* diffusers' reader drops ``resblocks.23`` of SD 2.x files by name, and its
  CLIP loader skips keys the model lacks for other depths, so reading the
  file back gives the text encoder we started from.

SD 2.x's ``text_projection``: SD 2.x never uses the pooled output and the
diffusers model has no projection (diffusers ignores the key), but ComfyUI
computes a pooled output from it and, when the file lacks the key, from
uninitialised memory. The identity is written: the pooled output is then the
normalised end-of-text state itself, the same on every run.

v-prediction SDXL: A1111 and ComfyUI recognise it only by a top-level
``v_pred`` key (and zero-terminal-SNR by ``ztsnr``); both are written for such
models and read back when a single file is imported.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# Per family: (prefix, layout) of each text encoder, in the pipeline's order.
TEXT_ENCODER_PREFIXES = {
    "sd1": (("cond_stage_model.transformer.", "clip"),),
    "sd2": (("cond_stage_model.model.", "open_clip"),),
    "sdxl": (("conditioner.embedders.0.transformer.", "clip"), ("conditioner.embedders.1.model.", "open_clip")),
}


class SingleFileError(ValueError):
    """A model cannot be written as a single-file checkpoint; the message says which weight and what to do."""


def to_single_file_state_dict(unet, vae, text_encoders: list, family: str,
                              dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """All weights of the pipeline under their original (LDM/sgm) names, cast to ``dtype``.

    ``text_encoders`` are the pipeline's encoders in order (one for SD 1.x/2.x,
    two for SDXL). Tensors stay on their device; where a weight already has
    ``dtype`` the returned tensor may share memory with the model, so clone
    before changing it. Raises SingleFileError for a weight that has no place
    in the original layout (an unfused LoRA adapter, a non-SD block type).
    """
    from core.base.families import get_family

    name = get_family(family).name
    if name not in TEXT_ENCODER_PREFIXES:
        raise SingleFileError(f"{get_family(family).label} models are written as their transformer alone "
                              f"(core.base.flow_checkpoint), not as an SD checkpoint")
    layouts = TEXT_ENCODER_PREFIXES[name]
    if len(text_encoders) != len(layouts):
        raise SingleFileError(f"a {name} checkpoint needs {len(layouts)} text encoder(s), got {len(text_encoders)}")
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise SingleFileError(f"dtype {dtype} is not a checkpoint precision; use torch.float16, bfloat16 or float32")

    out: dict[str, torch.Tensor] = {}
    parts = [(UNET_PREFIX, _unet(unet)), (VAE_PREFIX, _vae(vae))]
    for encoder, (prefix, layout) in zip(text_encoders, layouts, strict=True):
        # Only SD 2.x's encoder lacks OpenCLIP's last layer (SDXL's bigG keeps all of them).
        pairs = _clip(encoder) if layout == "clip" else _open_clip(encoder, zero_last_layer=name == "sd2")
        parts.append((prefix, pairs))
    for prefix, pairs in parts:
        for key, tensor in pairs:
            key = prefix + key
            if key in out:
                raise SingleFileError(f"two weights map to {key}; the model has a layout this converter does not know")
            out[key] = _cast(tensor, dtype)
    return out


def save_single_file(path, unet, vae, text_encoders: list, family: str, dtype: torch.dtype = torch.float16,
                     metadata: dict | None = None, prediction_type: str = "epsilon", zero_snr: bool = False) -> Path:
    """Write the pipeline as one ``.safetensors`` checkpoint at ``path`` (atomically) and return the path.

    ``metadata`` (string keys and values) goes into the file's header as is. An SDXL model that predicts
    ``v_prediction`` gets the ``v_pred`` marker key (and ``ztsnr`` with ``zero_snr``), which is how A1111 and
    ComfyUI tell such a checkpoint from an epsilon one.
    """
    from core.fsutil import save_safetensors

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise SingleFileError(f"{path.name}: single-file checkpoints are written as .safetensors; use that suffix")
    bad = [k for k, v in (metadata or {}).items() if not (isinstance(k, str) and isinstance(v, str))]
    if bad:
        raise SingleFileError(f"metadata values must be strings (safetensors headers hold text); not: {bad}")
    state = to_single_file_state_dict(unet, vae, text_encoders, family, dtype)
    if family == "sdxl" and prediction_type == "v_prediction":
        state["v_pred"] = torch.tensor([])
        if zero_snr:
            state["ztsnr"] = torch.tensor([])
    # safetensors writes from CPU memory
    state = {k: v.to("cpu") for k, v in state.items()}
    save_safetensors(path, state, metadata=dict(metadata) if metadata else None, durable=True)
    return path


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    tensor = tensor.detach()
    if tensor.is_floating_point():
        tensor = tensor.to(dtype)
    return tensor.contiguous()


def _state(module, what: str) -> dict[str, torch.Tensor]:
    """The module's state dict, refusing unfused adapter layers (they have no original-format name)."""
    state = module.state_dict()
    adapter = next((k for k in state if ".base_layer." in k or ".lora_" in k), None)
    if adapter:
        raise SingleFileError(
            f"the {what} still has LoRA adapter layers ({adapter}); fuse them into the weights first "
            "(pipe.fuse_lora(), then pipe.unload_lora_weights()) so the checkpoint holds plain weights")
    return state


# --- UNet -----------------------------------------------------------------------------------------------


def _unet(unet) -> Iterator[tuple[str, torch.Tensor]]:
    from core.lora.kohya_names import ldm_unet_path

    for name, tensor in _state(unet, "UNet").items():
        module, _, param = name.rpartition(".")
        try:
            yield f"{ldm_unet_path(module, unet.config)}.{param}", tensor
        except ValueError as exc:
            raise SingleFileError(f"UNet weight {name}: {exc}") from None


# --- VAE ------------------------------------------------------------------------------------------------

# diffusers ResnetBlock2D layer -> the LDM VAE's ResnetBlock layer (same names but the shortcut).
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
               "conv_shortcut": "nin_shortcut"}
# diffusers Attention layer -> the LDM VAE's AttnBlock layer (1x1 convolutions there).
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_TOP = {"conv_in": "conv_in", "conv_out": "conv_out", "conv_norm_out": "norm_out"}


def _vae(vae) -> Iterator[tuple[str, torch.Tensor]]:
    up_blocks = len(vae.config.up_block_types)
    for name, tensor in _state(vae, "VAE").items():
        module, _, param = name.rpartition(".")
        ldm = _vae_name(module, up_blocks)
        if ldm is None:
            raise SingleFileError(f"VAE weight {name} has no place in the original VAE layout")
        if ".mid.attn_1." in ldm and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # Linear weight [out, in] -> 1x1 Conv2d weight [out, in, 1, 1]
        yield f"{ldm}.{param}", tensor


def _vae_name(module: str, up_blocks: int) -> str | None:
    """The LDM VAE module path of a diffusers ``AutoencoderKL`` module path, or None."""
    if module in ("quant_conv", "post_quant_conv"):
        return module
    side, _, rest = module.partition(".")
    if side not in ("encoder", "decoder"):
        return None
    if rest in _VAE_TOP:
        return f"{side}.{_VAE_TOP[rest]}"
    if m := re.fullmatch(r"mid_block\.resnets\.([01])\.(\w+)", rest):
        layer = _VAE_RESNET.get(m[2])
        return layer and f"{side}.mid.block_{int(m[1]) + 1}.{layer}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(\w+(?:\.0)?)", rest):
        layer = _VAE_ATTENTION.get(m[1])
        return layer and f"{side}.mid.attn_1.{layer}"
    # The encoder's down blocks keep their order; the decoder's up blocks are numbered from the
    # lowest resolution in diffusers and from the highest in LDM.
    kind, blocks, sampler = ("down", "down_blocks", "downsamplers") if side == "encoder" else ("up", "up_blocks",
                                                                                             "upsamplers")
    if m := re.fullmatch(rf"{blocks}\.(\d+)\.(resnets\.(\d+)\.(\w+)|{sampler}\.0\.conv)", rest):
        index = int(m[1]) if side == "encoder" else up_blocks - 1 - int(m[1])
        if index < 0:
            return None
        if m[3] is None:
            return f"{side}.{kind}.{index}.{kind}sample.conv"
        layer = _VAE_RESNET.get(m[4])
        return layer and f"{side}.{kind}.{index}.block.{m[3]}.{layer}"
    return None


# --- text encoders --------------------------------------------------------------------------------------

# Every weight of a transformers CLIP text model (CLIPTextModel / ...WithProjection).
_CLIP_KEY = re.compile(
    r"text_model\.(embeddings\.(token_embedding\.weight|position_embedding\.weight|position_ids)"
    r"|encoder\.layers\.(?P<layer>\d+)\.(?P<inner>(self_attn\.(q|k|v|out)_proj|layer_norm[12]|mlp\.fc[12])"
    r"\.(weight|bias))"
    r"|final_layer_norm\.(weight|bias))"
    r"|text_projection\.weight"
)


def _clip_state(encoder, what: str) -> dict[str, torch.Tensor]:
    """The encoder's weights under transformers' ``text_model.`` names, every key checked.

    transformers 5.6+ flattened ``CLIPTextModel`` (no ``text_model.`` level) but not
    ``CLIPTextModelWithProjection``; the original checkpoints always have the level.
    """
    state = {}
    for key, tensor in _state(encoder, what).items():
        if not key.startswith("text_model.") and key != "text_projection.weight":
            key = "text_model." + key
        if not _CLIP_KEY.fullmatch(key):
            raise SingleFileError(f"{what} weight {key} is not part of a CLIP text model; "
                                  "only CLIP text encoders can be written in the original layout")
        state[key] = tensor
    return state


def _clip(encoder) -> Iterable[tuple[str, torch.Tensor]]:
    """SD 1.x and SDXL's first encoder: the original code wraps a transformers CLIPTextModel, same names."""
    state = _clip_state(encoder, "text encoder")
    if "text_projection.weight" in state:
        raise SingleFileError("this text encoder has a text_projection; the original layout's CLIP-L slot holds "
                              "a CLIPTextModel without one (only SDXL's second encoder has a projection)")
    return state.items()


# transformers CLIP encoder-layer names -> OpenCLIP ResidualAttentionBlock names.
_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_OPEN_CLIP_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}


def _open_clip(encoder, zero_last_layer: bool) -> list[tuple[str, torch.Tensor]]:
    """OpenCLIP's text tower: q/k/v packed into ``attn.in_proj_*`` (in that order, as
    ``nn.MultiheadAttention`` stores them), ``text_projection`` as the matrix OpenCLIP
    multiplies by (``x @ text_projection``, i.e. the Linear weight transposed: [hidden, projection])."""
    state = _clip_state(encoder, "OpenCLIP text encoder")
    out: list[tuple[str, torch.Tensor]] = []
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        m = _CLIP_KEY.fullmatch(key)
        if m["layer"] is not None:
            layers.setdefault(int(m["layer"]), {})[m["inner"]] = tensor
        elif key == "text_projection.weight":
            out.append(("text_projection", tensor.T))
        elif key in _OPEN_CLIP_TOP:
            out.append((_OPEN_CLIP_TOP[key], tensor))
        # text_model.embeddings.position_ids (older transformers saved it): OpenCLIP has no such buffer
    if sorted(layers) != list(range(len(layers))):
        raise SingleFileError(f"OpenCLIP text encoder: layer numbers {sorted(layers)} are not 0..{len(layers) - 1}")
    for i in range(len(layers)):
        out += _open_clip_layer(i, layers[i])
    if zero_last_layer and layers:
        out += [(key, torch.zeros_like(tensor)) for key, tensor in _open_clip_layer(len(layers), layers[0])]
    if "text_projection.weight" not in state and layers:  # SD 2.x: see the module docstring
        width = layers[0]["self_attn.q_proj.weight"].shape[1]
        out.append(("text_projection", torch.eye(width, dtype=layers[0]["self_attn.q_proj.weight"].dtype)))
    return out


def _open_clip_layer(index: int, layer: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    prefix = f"transformer.resblocks.{index}."
    missing = [f"{n}.{k}" for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", *_OPEN_CLIP_LAYER)
               for k in ("weight", "bias") if f"{n}.{k}" not in layer]
    if missing:
        raise SingleFileError(f"OpenCLIP text encoder layer {index} lacks {', '.join(missing)}")
    out = []
    for kind in ("weight", "bias"):
        qkv = [layer[f"self_attn.{p}_proj.{kind}"] for p in "qkv"]
        out.append((f"{prefix}attn.in_proj_{kind}", torch.cat(qkv, dim=0)))
        out += [(f"{prefix}{new}.{kind}", layer[f"{old}.{kind}"]) for old, new in _OPEN_CLIP_LAYER.items()]
    return out
