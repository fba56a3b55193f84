"""Write a trained peft LoRA as a kohya/A1111 ``.safetensors`` file, and read such files back.

Why not diffusers' ``convert_state_dict_to_kohya``: it writes ``alpha = rank``
for every module, so a LoRA trained with ``lora_alpha != r`` is silently
rescaled by ``r / alpha`` in every UI that loads it. It also names SD-1.x text
encoder modules ``lora_te1_`` where kohya (and what people expect) uses
``lora_te_``. Here the names, ranks and alphas are read from the injected peft
layers themselves, which is where ``rank_pattern`` / ``alpha_pattern`` have
already been resolved per module, so what is written is what was trained.

Layout written (SD 1.x, as kohya's sd-scripts writes it)::

    lora_unet_<module path, dots as underscores>.lora_down.weight   # peft lora_A
    lora_unet_<...>.lora_up.weight                                  # peft lora_B
    lora_unet_<...>.alpha                                           # 0-d, real alpha
    lora_te_text_model_encoder_layers_0_self_attn_q_proj.<same three>

A loader applies ``up @ down * alpha / rank``; peft applies
``B @ A * lora_alpha / r``; so copying A, B and alpha reproduces the adapter.
"""

from __future__ import annotations

import json
import math
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from core.base.flow_names import kohya_module_name  # noqa: F401 - named with the other kohya rules

UNET_PREFIX = "lora_unet_"
TE_PREFIX = "lora_te_"
# Prefixes other kohya files use (SDXL's two text encoders); only read, never written.
TE_READ_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_")
_SAVE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)



def family_metadata(family: str = "sd1", prediction_type: str = "epsilon", resolution: int | None = None,
                    variant: str = "") -> dict:
    """What A1111 / Forge / ComfyUI look at to recognise a LoRA's model family.

    A1111 calls a LoRA SD1 when ``ss_v2`` is not "True" and the base version
    does not start with "sdxl_"; Forge additionally wants
    ``modelspec.architecture``. For FLUX and SD 3.5 the values are those
    sd-scripts writes (``flux1``; ``medium``, ``5-medium``, ``5-large``), and
    no prediction type (they predict a flow, which the model spec has no word for).
    """
    from core.base.families import get_family

    kind = get_family(family)
    meta = {
        "ss_network_module": {"flux": "networks.lora_flux", "sd3": "networks.lora_sd3"}.get(kind.name,
                                                                                         "networks.lora"),
        "ss_base_model_version": kind.base_model_version(prediction_type, variant),
        "ss_v2": str(kind.name == "sd2"),
        "ss_v_parameterization": str(prediction_type == "v_prediction"),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": kind.architecture(prediction_type, resolution or kind.native_resolution, variant),
        "modelspec.implementation": ("https://github.com/black-forest-labs/flux" if kind.name == "flux"
                                     else "diffusers"),
    }
    if kind.name == "flux":
        meta["ss_model_type"] = "flux"
    if not kind.flow:
        meta["modelspec.prediction_type"] = "v" if prediction_type == "v_prediction" else "epsilon"
    return meta


class LoraFileError(ValueError):
    """A file that should hold a LoRA cannot be read as one."""


# ---------------------------------------------------------------------------
# export: peft layers -> kohya tensors
# ---------------------------------------------------------------------------


def strip_wrappers(model: torch.nn.Module) -> torch.nn.Module:
    """Strip wrappers that only rename modules (torch.compile, DDP, PeftModel).

    Their prefixes (``_orig_mod.``, ``module.``, ``base_model.model.``) would
    otherwise end up in the kohya key names and no loader would find them.
    """
    from peft import PeftModel

    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif isinstance(model, PeftModel):
            model = model.get_base_model()
        else:
            return model


def _lora_layers(model: torch.nn.Module, adapter_name: str, what: str) -> list[tuple[str, Any]]:
    """Return ``(module path, peft LoRA layer)`` for every layer carrying ``adapter_name``.

    Looks at the layers rather than ``model.peft_config``: the layers hold
    what actually runs (r and alpha per module after ``rank_pattern`` /
    ``alpha_pattern``), and a model adapted with ``peft.inject_adapter_in_model``
    need not carry a config at all. Raises ValueError naming the adapters present.
    """
    from peft.tuners.lora import LoraLayer

    found, names = [], set()
    for path, module in strip_wrappers(model).named_modules():
        if not isinstance(module, LoraLayer):
            continue
        names.update(module.lora_A.keys(), module.lora_embedding_A.keys())
        if adapter_name in module.lora_A or adapter_name in module.lora_embedding_A:
            found.append((path, module))
    if not found:
        have = ", ".join(sorted(names)) or "none"
        raise ValueError(
            f"The {what} has no LoRA adapter named {adapter_name!r} (adapters present: {have}). "
            "Add one with add_adapter(LoraConfig(...)) before exporting, or pass the right adapter_name."
        )
    return found


def _check_exportable(path: str, layer: Any, adapter_name: str) -> None:
    """Refuse adapters whose effect the kohya LoRA format cannot express.

    kohya's ``networks.lora`` is exactly ``W + up @ down * alpha / rank`` on
    Linear and Conv2d layers; anything else would be silently dropped, and the
    file would load but not reproduce the training.
    """
    from peft.tuners.lora import layer as lora

    if layer.use_dora.get(adapter_name, False):
        raise ValueError(
            f"Adapter {adapter_name!r} uses DoRA (use_dora=True) at {path}: DoRA is not supported in the "
            "kohya LoRA export. Train without use_dora, or save in diffusers format instead."
        )
    if layer.lora_bias.get(adapter_name, False):
        raise ValueError(
            f"Adapter {adapter_name!r} has lora_bias=True at {path}: the kohya format has no LoRA bias. "
            "Train with lora_bias=False."
        )
    # (nn.ModuleDict has no .get)
    down = layer.lora_A[adapter_name] if adapter_name in layer.lora_A else None  # noqa: SIM401
    up = layer.lora_B[adapter_name] if adapter_name in layer.lora_B else None  # noqa: SIM401
    # Checked on the LoRA factors rather than the wrapper class, so quantised
    # bases (bitsandbytes Linear8bitLt/Linear4bit wrappers) still export.
    kinds = (torch.nn.Linear, torch.nn.Conv2d)
    plain = any(isinstance(down, kind) and isinstance(up, kind) for kind in kinds)
    if not plain or isinstance(layer, (lora.MultiheadAttention, lora.ParamWrapper)):
        raise ValueError(
            f"{path} is a {type(layer).__name__} LoRA layer; the kohya export supports only "
            "Linear and Conv2d layers. Remove it from target_modules."
        )
    groups = getattr(layer.get_base_layer(), "groups", 1)
    if groups != 1:
        raise ValueError(f"{path} is a grouped convolution (groups={groups}); kohya LoRA cannot express it.")


def _module_alpha(layer: Any, adapter_name: str) -> float:
    """The alpha a kohya loader needs so that ``alpha / rank`` equals peft's scale.

    Plain LoRA: the layer's own ``lora_alpha`` (``alpha_pattern`` already
    applied by peft). rsLoRA scales by ``alpha / sqrt(r)`` instead, and
    kohya loaders always divide by ``r``, so the equivalent alpha is
    ``alpha * sqrt(r)``.
    """
    alpha = float(layer.lora_alpha[adapter_name])
    if layer.use_rslora.get(adapter_name, False):
        alpha *= math.sqrt(layer.r[adapter_name])
    return alpha


def cpu_copy(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # copy=True: the result must not share memory with a live parameter that
    # training keeps updating, nor with another tensor (safetensors refuses that).
    return tensor.detach().to(device="cpu", dtype=dtype, copy=True).contiguous()


def _export_model(model, prefix: str, adapter_name: str, dtype: torch.dtype, what: str, namer=None) -> dict:
    """kohya tensors (down, up, alpha) for every LoRA layer of one model.

    ``namer(path)`` gives the kohya name of a module path; by default the
    path itself with dots as underscores after ``prefix``.
    """
    model = strip_wrappers(model)
    out: dict[str, torch.Tensor] = {}
    from core.lora.adapters import layer_tensors, lycoris_layers

    lycoris = lycoris_layers(model)
    for path, layer in lycoris:  # LoHa / LoKr, in the LyCORIS layout
        name = namer(path) if namer else kohya_module_name(prefix, path, model)
        for key, tensor in layer_tensors(layer, adapter_name).items():
            out[f"{name}.{key}"] = tensor.float().contiguous() if key == "alpha" else cpu_copy(tensor, dtype)
    if lycoris:
        return out
    for path, layer in _lora_layers(model, adapter_name, what):
        _check_exportable(path, layer, adapter_name)
        name = namer(path) if namer else kohya_module_name(prefix, path, model)
        out[f"{name}.lora_down.weight"] = cpu_copy(layer.lora_A[adapter_name].weight, dtype)
        out[f"{name}.lora_up.weight"] = cpu_copy(layer.lora_B[adapter_name].weight, dtype)
        # alpha stays float32 whatever `dtype` is: it is one number, and fp16
        # would round values such as 0.3, changing the scale it encodes.
        out[f"{name}.alpha"] = torch.tensor(_module_alpha(layer, adapter_name), dtype=torch.float32)
        if isinstance(getattr(layer, "lora_dora_scale", None), torch.nn.ParameterDict):
            from core.lora.dora import scale_tensor

            out[f"{name}.dora_scale"] = cpu_copy(scale_tensor(layer, adapter_name), dtype)
    return out


def _export_fused(denoiser, family: str, adapter_name: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A flow transformer's LoRA in sd-scripts' layout of the original model (see core.lora.fused_layout)."""
    from core.lora.fused_layout import export

    model = strip_wrappers(denoiser)
    layers = {}
    for path, layer in _lora_layers(model, adapter_name, "transformer"):
        _check_exportable(path, layer, adapter_name)
        layers[path] = (layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight,
                        _module_alpha(layer, adapter_name))
    return export(family, layers, model, dtype)


def kohya_state_dict(
    unet, text_encoder=None, adapter_name: str = "default", dtype=torch.float16, family: str = "sd1"
) -> dict[str, torch.Tensor]:
    """The adapter ``adapter_name`` of ``unet`` (and the text encoders) as kohya tensors for ``family``.

    ``unet`` is a diffusers ``UNet2DConditionModel``; ``text_encoder`` a
    transformers ``CLIPTextModel`` or a ``core.base.text.TextEncoders`` (SDXL's
    two), each with a peft LoRA adapter added (base weights may be fp16/bf16,
    LoRA weights fp32). Names are those sd-scripts writes: diffusers module
    names for SD 1.x/2.x (``lora_te_``), the original LDM names for SDXL's
    UNet (``lora_unet_input_blocks_...``) and ``lora_te1_``/``lora_te2_``.
    Weights are cast to ``dtype`` (fp16 by default, like kohya) and copied to
    CPU.

    Raises ValueError when a given model lacks the adapter, or the adapter
    uses something kohya LoRA cannot hold (DoRA, LoRA bias, embeddings).
    """
    from core.base.families import get_family

    if dtype not in _SAVE_DTYPES:
        raise ValueError(f"dtype must be one of float16, bfloat16, float32; got {dtype}")
    kind = get_family(family)
    from core.lora.adapters import LYCORIS_FLOW_PREFIX, lycoris_layers
    from core.lora.dora import dora_layers

    if kind.flow and (lycoris_layers(strip_wrappers(unet)) or dora_layers(strip_wrappers(unet))):
        # LoHa/LoKr cannot be stacked into a fused qkv, nor can DoRA's per-part input scales: diffusers names
        tensors = _export_model(unet, LYCORIS_FLOW_PREFIX, adapter_name, dtype, "transformer")
    elif kind.flow:
        tensors = _export_fused(unet, kind.name, adapter_name, dtype)
    else:
        namer = None
        if kind.ldm_unet_names:
            from core.lora.kohya_names import kohya_unet_key

            config = strip_wrappers(unet).config
            namer = lambda path: kohya_unet_key(path, config, ldm=True)  # noqa: E731
        tensors = _export_model(unet, UNET_PREFIX, adapter_name, dtype, "UNet", namer)
    if text_encoder is not None:
        if hasattr(text_encoder, "trainable"):  # core.base.text.TextEncoders: the ones that may carry a LoRA
            encoders = text_encoder.trainable()
        else:
            encoders = list(text_encoder.encoders) if hasattr(text_encoder, "encoders") else [text_encoder]
        if len(encoders) != len(kind.kohya_text_prefixes):
            raise ValueError(f"{kind.label} has {len(kind.kohya_text_prefixes)} text encoder(s), got {len(encoders)}")
        for prefix, encoder in zip(kind.kohya_text_prefixes, encoders, strict=True):
            tensors.update(_export_model(encoder, prefix + "_", adapter_name, dtype, "text encoder"))
    return tensors


# ---------------------------------------------------------------------------
# metadata
# ---------------------------------------------------------------------------


def _to_str(key: str, value: Any) -> str:
    """safetensors metadata is str -> str; A1111 and kohya store everything as text.

    Containers become JSON (as kohya writes ss_tag_frequency etc.), other
    values ``str()``. None is refused: it would become the string "None" and
    be read back as a value nobody meant.
    """
    if value is None:
        raise ValueError(f"metadata value for {key!r} is None; leave the key out instead")
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def stringify_metadata(metadata: dict | None) -> dict[str, str]:
    """Return ``metadata`` with every key and value a string (see ``_to_str``)."""
    return {str(k): _to_str(str(k), v) for k, v in (metadata or {}).items()}


def _resolution_pair(resolution) -> tuple[int, int]:
    if isinstance(resolution, int):
        return (resolution, resolution)
    width, height = resolution
    return (int(width), int(height))


def kohya_metadata(
    *,
    rank: int,
    alpha: float,
    output_name: str,
    resolution: int | tuple[int, int],
    steps: int,
    learning_rate: float,
    base_model: str,
    train_text_encoder: bool,
    extra: dict | None = None,
    family: str = "sd1",
    prediction_type: str = "epsilon",
    variant: str = "",
) -> dict[str, str]:
    """Training metadata in the spelling kohya's sd-scripts writes and A1111/ComfyUI show.

    Formats follow sd-scripts: dim an int, alpha a float (``"8.0"``),
    resolution a Python tuple (``"(512, 512)"``), timestamps Unix seconds,
    booleans ``"True"``/``"False"``. ``ss_sd_model_name`` is the base model's
    folder/file name, not its full local path (kohya does the same; a full
    path would publish the user's directory layout with every shared LoRA).
    ``ss_network_train_unet_only`` is this app's addition (kohya only keeps it
    as a command-line flag). ``extra`` is merged last, stringified.
    """
    width, height = _resolution_pair(resolution)
    now = time.time()
    model_name = Path(base_model).name if base_model and Path(base_model).exists() else base_model
    meta = {
        **family_metadata(family, prediction_type, max(width, height), variant),
        "ss_network_dim": str(int(rank)),
        "ss_network_alpha": str(float(alpha)),
        "ss_network_args": "{}",
        "ss_output_name": output_name,
        "ss_resolution": str((width, height)),
        "ss_steps": str(int(steps)),
        "ss_learning_rate": str(float(learning_rate)),
        "ss_sd_model_name": model_name,
        "ss_network_train_unet_only": str(not train_text_encoder),
        "ss_training_finished_at": str(now),
        "modelspec.title": output_name,
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.date": datetime.fromtimestamp(int(now), tz=UTC).isoformat(),
    }
    meta.update(stringify_metadata(extra))
    return meta


def _metadata_from_tensors(tensors: dict[str, torch.Tensor], family: str = "sd1") -> dict[str, str]:
    """kohya's minimum metadata (``SS_METADATA_MINIMUM_KEYS``), derived from the weights.

    Written even when the caller gives no metadata: A1111 treats a LoRA with
    no metadata at all as of unknown version and may hide it.
    """
    from core.lora.adapters import group_modules, rank_of

    ranks = [rank_of(parts) or 0 for parts in group_modules(tensors).values()] or [0]
    alphas = {float(t) for k, t in tensors.items() if k.endswith(".alpha")}
    alpha = str(alphas.pop()) if len(alphas) == 1 else "Dynamic"  # kohya's word for mixed
    unet_only = not any(k.startswith(TE_READ_PREFIXES) for k in tensors)
    sdxl = any(k.startswith(("lora_te1_", "lora_te2_", "lora_unet_input_blocks", "lora_unet_output_blocks",
                             "lora_unet_middle_block")) for k in tensors)
    guessed = "sdxl" if family == "sd1" and sdxl else family  # callers that name no family: tell SDXL by its keys
    return {
        **family_metadata(guessed, "flow" if guessed in ("flux", "sd3") else "epsilon"),
        "ss_network_dim": str(max(ranks)),
        "ss_network_alpha": alpha,
        "ss_network_args": "{}",
        "ss_network_train_unet_only": str(unet_only),
    }


def model_hash(tensors: dict[str, torch.Tensor]) -> str:
    """``sshs_model_hash``: sha256 of the file's tensor data (everything after the header).

    The tensor bytes do not depend on the metadata, so the hash identifies the
    weights however the header changes; it is what kohya's trainer and the
    A1111 additional-networks extension compute and show.
    """
    import hashlib
    import struct

    from safetensors.torch import save

    data = save(tensors)
    (header_length,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(data[8 + header_length:]).hexdigest()


def save_kohya_lora(
    path,
    unet,
    text_encoder=None,
    metadata: dict[str, str] | None = None,
    dtype=torch.float16,
    adapter_name: str = "default",
    family: str = "sd1",
) -> Path:
    """Write the adapter as one kohya ``.safetensors`` file, atomically; return its path.

    ``metadata`` (e.g. from ``kohya_metadata``) is stringified and laid over
    the minimum metadata derived from the weights. Everything is checked
    before anything is written, so a bad value leaves no file behind.
    """
    from core.fsutil import save_safetensors

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ValueError(
            f"{path}: kohya LoRA files must end in .safetensors (A1111 reads metadata only from those)"
        )
    user_metadata = stringify_metadata(metadata)
    tensors = kohya_state_dict(unet, text_encoder, adapter_name=adapter_name, dtype=dtype, family=family)
    bad = nonfinite_counts(tensors)
    if bad:
        raise NonFiniteWeightsError(bad)
    hashes = {"sshs_model_hash": model_hash(tensors)}
    save_safetensors(path, tensors, {**_metadata_from_tensors(tensors, family), **user_metadata, **hashes},
                     durable=True)
    return path


class NonFiniteWeightsError(ValueError):
    """LoRA weights hold NaN or infinity; such a file is never written (it would turn every image black)."""

    def __init__(self, counts: dict[str, int]):
        self.counts = counts
        total = sum(counts.values())
        names = ", ".join(list(counts)[:3]) + (" ..." if len(counts) > 3 else "")
        super().__init__(f"{total:,} LoRA weight value(s) are NaN or infinite, in {len(counts)} tensor(s) ({names})")


def nonfinite_counts(tensors: dict) -> dict[str, int]:
    """{name: number of NaN/inf values} of the tensors that hold any (empty when all are finite)."""
    import torch

    counts = {}
    for name, tensor in tensors.items():
        if tensor.is_floating_point():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                counts[name] = bad
    return counts
