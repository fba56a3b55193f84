"""Single transformer files of the flow families: written in the original models' layout, read with a companion.

Model sites ship SD 3.5, FLUX.1, FLUX.2 and Z-Image fine-tunes mostly as the
transformer alone, in the original names (Stability's MMDiT, Black Forest
Labs' FLUX, ComfyUI's Z-Image repack) that ComfyUI's diffusion-model loader
and diffusers' ``from_single_file`` read; the text encoders and the VAE are
the family's and come from elsewhere.

* ``original_state_dict`` turns a diffusers transformer into that layout
  (q, k, v fused, scale/shift halves of the final modulation swapped), which
  ``merge`` writes;
* ``convert_transformer_file`` makes a diffusers folder of such a file: the
  transformer converted from it, every other part linked from a diffusers
  folder of the same family (``core.base.checkpoints`` finds it:
  ``models/configs/<family>``, any such model in ``models/``, or the family's
  hub repository when online).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from core.base.flow_names import LAYOUTS, depth_of

# Modules outside the blocks, and the norms inside them (not linear layers, so not in the LoRA layout).
_TOP = {
    "flux": {"x_embedder": "img_in", "context_embedder": "txt_in",
             "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
             "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
             "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
             "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
             "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
             "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
             "proj_out": "final_layer.linear", "norm_out.linear": "final_layer.adaLN_modulation.1"},
    "sd3": {"pos_embed.proj": "x_embedder.proj", "context_embedder": "context_embedder",
            "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
            "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
            "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
            "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
            "proj_out": "final_layer.linear", "norm_out.linear": "final_layer.adaLN_modulation.1"},
    "flux2": {"x_embedder": "img_in", "context_embedder": "txt_in",
              "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
              "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
              "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
              "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
              "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
              "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
              "single_stream_modulation.linear": "single_stream_modulation.lin",
              "proj_out": "final_layer.linear", "norm_out.linear": "final_layer.adaLN_modulation.1"},
    # Z-Image keeps every other name (cap_embedder, t_embedder, the pad tokens) as the original has it.
    "zimage": {"all_x_embedder.2-1": "x_embedder", "all_final_layer.2-1.linear": "final_layer.linear",
               "all_final_layer.2-1.adaLN_modulation.1": "final_layer.adaLN_modulation.1"},
}
# Layouts whose final modulation stores (shift, scale) where diffusers stores (scale, shift).
_SWAPPED_FINAL = ("flux", "sd3", "flux2")
# Families whose block layers not listed in the layout keep their names (Z-Image's norms and modulations).
_SAME_NAMES = ("zimage",)
_NORMS = {
    "flux": {"transformer_blocks": {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
                                    "attn.norm_added_q": "txt_attn.norm.query_norm",
                                    "attn.norm_added_k": "txt_attn.norm.key_norm"},
             "single_transformer_blocks": {"attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}},
    "sd3": {"transformer_blocks": {"attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
                                   "attn.norm_added_q": "context_block.attn.ln_q",
                                   "attn.norm_added_k": "context_block.attn.ln_k",
                                   "attn2.norm_q": "x_block.attn2.ln_q", "attn2.norm_k": "x_block.attn2.ln_k"}},
    "flux2": {"transformer_blocks": {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
                                     "attn.norm_added_q": "txt_attn.norm.query_norm",
                                     "attn.norm_added_k": "txt_attn.norm.key_norm"},
              "single_transformer_blocks": {"attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}},
    "zimage": {name: {"attention.norm_q": "attention.q_norm", "attention.norm_k": "attention.k_norm"}
               for name in ("layers", "noise_refiner", "context_refiner")},
}
# The original name of a norm's weight: FLUX's RMS norms keep it as "scale".
_NORM_WEIGHT = {"flux": "scale", "sd3": "weight", "flux2": "scale", "zimage": "weight"}


def _plan(transformer, family: str) -> dict[str, tuple[str, int | None, bool]]:
    """{diffusers weight name: (original name, position in a fused weight or None, scale/shift swapped)}."""
    layout, depth = LAYOUTS[family], depth_of(transformer)
    plan = {}
    for name in transformer.state_dict():
        module, _, param = name.rpartition(".")
        if name == "pos_embed.pos_embed":  # SD3's position table is a buffer, stored as is
            plan[name] = ("pos_embed", None, False)
            continue
        if module in _TOP[family]:
            swap = module == "norm_out.linear" and family in _SWAPPED_FINAL
            plan[name] = (f"{_TOP[family][module]}.{param}", None, swap)
            continue
        block = re.fullmatch(r"([a-z_]+)\.(\d+)\.(.+)", module)
        if block is None or block.group(1) not in layout.blocks:
            if family in _SAME_NAMES:
                plan[name] = (name, None, False)
                continue
            raise ValueError(f"{family} transformer weight {name!r} has no name in the original layout")
        kind, number, inner = block.groups()
        norm = _NORMS[family].get(kind, {}).get(inner)
        if norm is not None:
            plan[name] = (f"{layout.blocks[kind][0]}.{number}.{norm}.{_NORM_WEIGHT[family]}", None, False)
            continue
        if family in _SAME_NAMES and inner not in layout.blocks[kind][1]:
            plan[name] = (name, None, False)
            continue
        original, part = layout.original_name(module, depth)
        plan[name] = (f"{original}.{param}", part, part is None and layout.swapped(original, depth))
    return plan


def original_state_dict(transformer, family: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The transformer's weights under the original model's names, as its single files hold them."""
    fused: dict[str, dict[int, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    state = transformer.state_dict()
    for name, (original, part, swap) in _plan(transformer, family).items():
        tensor = state[name].detach().to("cpu")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        if part is None:
            out[original] = _swap(tensor) if swap else tensor
        else:
            fused.setdefault(original, {})[part] = tensor
    for key, parts in fused.items():
        out[key] = torch.cat([parts[i] for i in sorted(parts)])
    return {k: v.contiguous() for k, v in out.items()}


def diffusers_state_dict(original: dict[str, torch.Tensor], family: str, shapes) -> dict[str, torch.Tensor]:
    """The inverse: a single file's weights (original names, any ``model.diffusion_model.`` prefix) for a
    diffusers transformer ``shapes`` (one built on the meta device from the config suffices). Reads every width
    (diffusers' own FLUX converter assumes FLUX.1's 3072). KeyError names a weight the file lacks."""
    original = {k.removeprefix("model.diffusion_model."): v for k, v in original.items()}
    sizes = {name: t.shape[0] if t.dim() else 1 for name, t in shapes.state_dict().items()}
    plan = _plan(shapes, family)
    offsets: dict[str, int] = {}
    out = {}
    for name, (key, part, swap) in sorted(plan.items(), key=lambda item: (item[1][0], item[1][1] or 0)):
        if key not in original:
            raise KeyError(f"the file has no {key!r} (needed for {name})")
        tensor = original[key]
        if part is not None:
            start = offsets.get(key, 0)
            offsets[key] = start + sizes[name]
            tensor = tensor[start:start + sizes[name]]
        out[name] = (_swap(tensor) if swap else tensor).contiguous()
    return out


def _swap(tensor: torch.Tensor) -> torch.Tensor:
    """(scale, shift) <-> (shift, scale): the two halves of the final modulation's output."""
    half = tensor.shape[0] // 2
    return torch.cat([tensor[half:], tensor[:half]])


def transformer_file_family(keys: list[str]) -> str | None:
    """flux, flux2, sd3 or zimage for a checkpoint holding that family's transformer (alone or with more), else
    None."""
    names = [k.removeprefix("model.diffusion_model.") for k in keys]
    if any(k.startswith("double_stream_modulation_img.") for k in names):  # FLUX.2's shared modulations
        return "flux2"
    if any(k.startswith("double_blocks.") for k in names):
        return "flux"
    if any(k.startswith("cap_embedder.") for k in names) and any(k.startswith("noise_refiner.") for k in names):
        return "zimage"
    if any(k.startswith("joint_blocks.") for k in names):
        return "sd3"
    return None


def convert_transformer_file(path: Path, family: str, companion: Path, target: Path) -> None:
    """A diffusers folder at ``target``: the transformer from ``path``, the other parts linked from
    ``companion`` (a complete diffusers folder of the family; core.base.checkpoints finds one). Raises
    ValueError/KeyError/OSError when the file is not such a transformer."""
    from core.base.families import get_family
    from core.fsutil import new_folder

    kind = get_family(family)
    transformer = read_transformer(path, family, companion)
    target.parent.mkdir(parents=True, exist_ok=True)
    with new_folder(target) as tmp:
        tmp = Path(tmp)
        transformer.save_pretrained(tmp / kind.denoiser, safe_serialization=True)
        for part in ("vae", "scheduler", *kind.text_encoders, *kind.tokenizers):
            _link(Path(companion) / part, tmp / part)
        (tmp / "model_index.json").write_text((Path(companion) / "model_index.json").read_text(encoding="utf-8"),
                                              encoding="utf-8")
        (tmp / "converted_from.json").write_text(json.dumps(
            {"file": str(path), "family": family, "transformer": str(path), "other_parts": str(companion)},
            indent=2), encoding="utf-8")


def read_transformer(path: Path, family: str, companion: Path | None = None):
    """The diffusers transformer of a single file, in the file's precision (float8 widened to bf16). Its config
    is the companion's when that has one of the same shapes, else the family's reference of the variant the
    file's keys show (FLUX.1-dev has a guidance input, schnell none; SD 3.5 Large has 38 blocks, Medium attn2)."""
    import diffusers
    from safetensors.torch import load_file

    from core.base.families import get_family

    kind = get_family(family)
    tensors = load_file(str(path))
    config = _config_for(tensors, family, companion)
    cls = getattr(diffusers, kind.denoiser_class)
    with torch.device("meta"):
        model = cls.from_config(config)
    state = diffusers_state_dict(tensors, family, model)
    del tensors
    float8 = (torch.float8_e4m3fn, torch.float8_e5m2)
    state = {k: v.to(torch.bfloat16) if v.dtype in float8 else v for k, v in state.items()}
    model.load_state_dict(state, assign=True, strict=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"weights missing from the file: {', '.join(left[:5])}")
    return model.eval()


def _config_for(tensors: dict, family: str, companion: Path | None) -> dict:
    from core.base.reference import reference_config

    names = {k.removeprefix("model.diffusion_model.") for k in tensors}
    if family == "flux":
        variant = "flux" if "guidance_in.in_layer.weight" in names else "flux-schnell"
    elif family == "sd3":
        depth = len({k.split(".")[1] for k in names if k.startswith("joint_blocks.")})
        variant = "sd3" if depth >= 38 else "sd3-medium"
    elif family == "flux2":  # klein 4B has 5 double blocks, 9B 8
        depth = len({k.split(".")[1] for k in names if k.startswith("double_blocks.")})
        variant = "flux2-9b" if depth >= 8 else "flux2"
    else:
        variant = family  # Z-Image: Turbo and base share their shapes
    own = companion / "transformer" / "config.json" if companion else None
    if own is not None and own.is_file():
        config = json.loads(own.read_text(encoding="utf-8"))
        blocks = len({k.split(".")[1] for k in names if k.startswith(("double_blocks.", "joint_blocks.", "layers."))})
        layers = config.get("num_layers", config.get("n_layers"))
        if layers == blocks and (family != "flux" or bool(config.get("guidance_embeds")) == (variant == "flux")):
            return config
    return reference_config(variant, "transformer")


def _link(source: Path, dest: Path) -> None:
    """A symbolic link to the companion's part (gigabytes of T5 are not copied); a copy where the file system
    allows no links (Windows without developer mode)."""
    import shutil

    try:
        os.symlink(source.resolve(), dest, target_is_directory=True)
    except OSError:
        shutil.copytree(source, dest)
