"""The adapter kinds (``lora.type``): LoRA, LoCon, LoHa, LoKr, trained through peft, written in the LyCORIS layout.

peft trains all four: ``LoraConfig`` (LoRA; LoCon is LoRA that also covers the
UNet's convolution layers, at ``lora.conv_rank``), ``LoHaConfig`` and
``LoKrConfig``, whose factors are LyCORIS' own (peft's modules follow
LyCORIS). The files use the key names A1111, Forge and ComfyUI load without an
extension, the kohya module name followed by:

    LoRA / LoCon  lora_down.weight, lora_up.weight, alpha     W + up @ down * alpha / rank
    LoHa          hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b, alpha
                                          W + (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank
    LoKr          lokr_w1 (or lokr_w1_a, lokr_w1_b), lokr_w2 (or lokr_w2_a, lokr_w2_b), alpha
                                          W + kron(w1, w2) * alpha / rank

where rank is ``hada_w1_b``'s (``lokr_w2_b``'s, else ``lokr_w1_b``'s) first
size, and a convolution's update is the product reshaped to the kernel's shape.
A LoKr whose two factors are both whole matrices has no rank; its readers then
apply the product unscaled, so the scale is folded into ``lokr_w1`` and no
alpha is written.

Reading such a file back (the Prompt tab, ``verify-lora``, ``merge``):
diffusers' loaders know only LoRA, so ``inject`` puts the file's factors into
peft LoHa/LoKr layers of the pipeline's own models, where strength, switching
off and fusing work as for a LoRA.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from core.lora.module_names import LYCORIS_FLOW_PREFIX  # noqa: F401 - the export names it from here

KINDS = ("lora", "locon", "loha", "lokr")

LOHA_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR_KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
# Parts of a module in a file with a meaning no reader here applies: refused rather than dropped.
UNSUPPORTED_KEYS = ("hada_t1", "hada_t2", "lokr_t2", "lora_mid.weight", "oft_blocks", "oft_diag",
                    "diff", "diff_b", "w_norm", "b_norm", "a1.weight", "a2.weight", "b1.weight", "b2.weight")

# The UNet's convolutions a LoCon trains (sd-scripts' and LyCORIS' choice): the ResNet blocks' and the
# down/upsamplers'; never conv_in / conv_out, which sd-scripts-based tools cannot place.
_CONV = re.compile(r"((down|up)_blocks\.\d+|mid_block)\.resnets\.\d+\.(conv1|conv2|conv_shortcut)"
                   r"|(down|up)_blocks\.\d+\.(down|up)samplers\.0\.conv")


def conv_targets(denoiser) -> list[str]:
    """Paths of the convolution layers a LoCon (or a LoHa/LoKr with conv_rank) trains; none in a transformer."""
    return [path for path, module in denoiser.named_modules()
            if isinstance(module, torch.nn.Conv2d) and _CONV.fullmatch(path)]


def peft_config(kind: str, rank: int, alpha: float, targets: list[str], *, conv: list[str] = (),
                conv_rank: int = 0, conv_alpha: float = 1.0, dropout: float = 0.0, lokr_factor: int = -1,
                init: Any = "gaussian", ranks: dict | None = None, alphas: dict | None = None):
    """The peft config of one model's adapter: ``targets`` (names or suffixes, as peft matches them) at
    ``rank``/``alpha``, the convolution paths ``conv`` at ``conv_rank``/``conv_alpha``, and module paths of
    ``ranks``/``alphas`` at their own (per-block ranks, core.lora.blocks)."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    if kind not in KINDS:
        raise ValueError(f"lora.type = {kind!r}: choose one of {', '.join(KINDS)}")
    conv = list(conv)
    # peft reads pattern keys as regular expressions
    rank_pattern = {re.escape(path): conv_rank for path in conv} | {re.escape(p): r for p, r in (ranks or {}).items()}
    alpha_pattern = ({re.escape(path): conv_alpha for path in conv}
                     | {re.escape(p): a for p, a in (alphas or {}).items()})
    common = {"r": rank, "target_modules": list(targets) + conv, "rank_pattern": rank_pattern,
              "alpha_pattern": alpha_pattern}
    if kind in ("lora", "locon"):
        return LoraConfig(lora_alpha=alpha, lora_dropout=dropout, init_lora_weights=init, **common)
    if kind == "loha":
        return LoHaConfig(alpha=alpha, init_weights=init is not False, **common)
    return LoKrConfig(alpha=alpha, decompose_factor=lokr_factor, init_weights=init is not False, **common)


def add_adapter(model, config, adapter: str = "default") -> None:
    """Put a peft adapter on a model: a diffusers model through its own ``add_adapter``; a transformers
    text encoder (whose integration wants a newer peft than the one pinned) injected directly, its
    ``peft_config`` set where peft's state-dict helpers and diffusers' ``set_adapters`` look for it."""
    from peft import inject_adapter_in_model

    if hasattr(model, "add_adapter") and hasattr(model, "set_adapters"):
        model.add_adapter(config, adapter_name=adapter)
        return
    inject_adapter_in_model(config, model, adapter_name=adapter)
    model.peft_config = {**(getattr(model, "peft_config", None) or {}), adapter: config}


# ---------------------------------------------------------------------------
# export: peft LoHa / LoKr layers -> LyCORIS tensors


def lycoris_layers(model) -> list[tuple[str, Any]]:
    """(path, layer) of every peft LoHa / LoKr layer of ``model``."""
    from peft.tuners.loha import LoHaLayer
    from peft.tuners.lokr import LoKrLayer

    return [(path, m) for path, m in model.named_modules() if isinstance(m, (LoHaLayer, LoKrLayer))]


def layer_tensors(layer, adapter: str) -> dict[str, torch.Tensor]:
    """One LoHa/LoKr layer's factors under their file names, with the alpha its readers need (float32)."""
    from peft.tuners.loha import LoHaLayer

    if any(adapter in getattr(layer, name, {}) for name in ("hada_t1", "lokr_t2")):
        raise ValueError("a LoHa/LoKr trained with use_effective_conv2d has a Tucker core these files do not "
                         "hold; train without it")
    rank, alpha = layer.r[adapter], float(layer.alpha[adapter])
    names = LOHA_KEYS if isinstance(layer, LoHaLayer) else LOKR_KEYS
    out = {name: getattr(layer, name)[adapter].detach() for name in names if adapter in getattr(layer, name)}
    if not isinstance(layer, LoHaLayer) and "lokr_w1_b" not in out and "lokr_w2_b" not in out:
        out["lokr_w1"] = out["lokr_w1"] * (alpha / rank)  # no rank for a reader to divide by: fold the scale in
        return out
    out["alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return out


# ---------------------------------------------------------------------------
# reading: a file's modules, their updates, and injection into a pipeline


def kind_of(parts: dict[str, torch.Tensor]) -> str:
    """"lora", "dora", "loha" or "lokr" for one module's tensors (suffix -> tensor); ValueError for others."""
    odd = sorted(k for k in parts if k in UNSUPPORTED_KEYS)
    if "dora_scale" in parts and "lora_down.weight" not in parts:
        odd.append("dora_scale on a LoHa/LoKr")
    if odd:
        raise ValueError(f"holds {', '.join(odd)}: a LyCORIS variant this app cannot apply")
    if "dora_scale" in parts:
        return "dora"
    if "hada_w1_a" in parts:
        return "loha"
    if any(k.startswith("lokr_") for k in parts):
        return "lokr"
    if "lora_down.weight" in parts:
        return "lora"
    raise ValueError(f"holds no known adapter weights ({', '.join(sorted(parts))})")


def rank_of(parts: dict[str, torch.Tensor]) -> int | None:
    """The rank a reader divides alpha by, or None (a LoKr of two whole matrices)."""
    if "hada_w1_b" in parts:
        return parts["hada_w1_b"].shape[0]
    for key in ("lokr_w2_b", "lokr_w1_b", "lora_down.weight"):
        if key in parts:
            return parts[key].shape[0]
    return None


def group_modules(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """A file's tensors per module name: ``{module: {suffix: tensor}}`` (suffix without the leading dot)."""
    known = ("lora_down.weight", "lora_up.weight", "alpha", "dora_scale", *LOHA_KEYS, *LOKR_KEYS, *UNSUPPORTED_KEYS)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        for suffix in known:
            if key.endswith("." + suffix):
                modules.setdefault(key[: -len(suffix) - 1], {})[suffix] = tensor
                break
    return modules


def is_lycoris(tensors: dict[str, torch.Tensor]) -> bool:
    """Whether a file holds LoHa / LoKr / DoRA (or other LyCORIS-only) modules, which diffusers' loaders drop."""
    lycoris = tuple("." + k for k in (*LOHA_KEYS, *LOKR_KEYS, "dora_scale", *UNSUPPORTED_KEYS))
    return any(key.endswith(lycoris) for key in tensors)


def delta(parts: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """The weight update one module of a file makes at strength 1 (float32), shaped like the weight ``shape``."""
    kind = kind_of(parts)
    rank = rank_of(parts)
    alpha = parts.get("alpha")
    scale = float(alpha) / rank if alpha is not None and rank else 1.0
    f = {k: v.float() for k, v in parts.items()}
    if kind == "dora" and f["dora_scale"].numel() != shape[1]:
        raise ValueError(f"dora_scale has {f['dora_scale'].numel()} values for a layer of {shape[1]} inputs")
    if kind in ("lora", "dora"):  # (a DoRA's magnitude acts on the whole weight: see core.lora.dora)
        # a LoCon convolution keeps its kernel in down (rank, in, k, k) and a 1x1 up (out, rank, 1, 1)
        return (f["lora_up.weight"].flatten(1) @ f["lora_down.weight"].flatten(1)).reshape(shape) * scale
    if kind == "loha":
        return ((f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"])).reshape(shape) * scale
    w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
    w2 = f["lokr_w2"] if "lokr_w2" in f else f["lokr_w2_a"] @ f["lokr_w2_b"]
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2).reshape(shape) * scale


def inject(model, modules: dict[str, dict[str, torch.Tensor]], adapter: str) -> None:
    """Put a file's LoHa / LoKr modules (``{module path in model: {suffix: tensor}}``) into peft layers of
    ``model`` under ``adapter``, so that peft (and diffusers' ``set_adapters``, ``fuse_lora``) apply them.

    peft derives a LoKr's factor shapes from its factor setting; the file's own factors replace the ones it
    made, whatever their shapes, since the update is their product reshaped to the weight.
    """
    by_kind: dict[str, list[str]] = {}
    for path, parts in modules.items():
        by_kind.setdefault(kind_of(parts), []).append(path)
    for kind, paths in by_kind.items():
        if kind == "lora":
            raise ValueError("inject is for LoHa / LoKr / DoRA modules; LoRA modules load through diffusers")
        ranks = {p: rank_of(modules[p]) for p in paths} if kind == "dora" else None
        alphas = ({p: float(modules[p].get("alpha", rank_of(modules[p]))) for p in paths} if kind == "dora"
                  else None)
        config = peft_config("lora" if kind == "dora" else kind, 1, 1.0, [re.escape(p) for p in paths], init=True,
                             ranks=ranks, alphas=alphas)
        config.target_modules = "|".join(f"({re.escape(p)})" for p in paths)  # exact paths, as one pattern
        add_adapter(model, config, adapter)
        if kind == "dora":
            from core.lora.dora import add_dora

            for path in paths:
                layer = model.get_submodule(path)
                with torch.no_grad():
                    layer.lora_A[adapter].weight.copy_(modules[path]["lora_down.weight"].reshape(
                        layer.lora_A[adapter].weight.shape))
                    layer.lora_B[adapter].weight.copy_(modules[path]["lora_up.weight"].reshape(
                        layer.lora_B[adapter].weight.shape))
            add_dora(model, adapter, {p: modules[p]["dora_scale"] for p in paths})
            continue
        for path in paths:
            _fill(model.get_submodule(path), modules[path], adapter)


def _fill(layer, parts: dict[str, torch.Tensor], adapter: str) -> None:
    weight = layer.get_base_layer().weight
    names = LOHA_KEYS if "hada_w1_a" in parts else LOKR_KEYS
    for name in names:
        store = getattr(layer, name)
        if adapter in store:
            del store[adapter]
        if name in parts:
            store[adapter] = torch.nn.Parameter(parts[name].to(weight.device, torch.float32), requires_grad=False)
    rank = rank_of(parts)
    alpha = float(parts["alpha"]) if "alpha" in parts and rank else None
    layer.r[adapter] = rank or 1
    layer.alpha[adapter] = alpha if alpha is not None else (rank or 1)
    layer.scaling[adapter] = layer.alpha[adapter] / layer.r[adapter]


def load_into(pipe, family, tensors: dict[str, torch.Tensor], adapter: str) -> None:
    """Add a LoHa / LoKr file to a diffusers pipeline of ``family`` as the peft adapter ``adapter``.

    Raises ValueError naming the first module the pipeline's models do not have, or a module kind that
    cannot be applied; a file mixing kinds is refused, since peft holds one kind per adapter and model.
    """
    from core.lora.module_names import module_index

    encoders = [getattr(pipe, name) for name in family.text_encoders]
    denoiser = getattr(pipe, family.denoiser)
    index = module_index(denoiser, encoders, family)
    owners = {}
    for owner in [denoiser, *encoders]:
        for path, module in owner.named_modules():
            owners.setdefault(id(module), (owner, path.removesuffix(".base_layer")))
    modules = group_modules(tensors)
    kinds = {name: kind_of(parts) for name, parts in modules.items()}
    if len(set(kinds.values())) > 1:
        raise ValueError(f"mixes {' and '.join(sorted(set(kinds.values())))} modules, which this app cannot load "
                         f"as one adapter")
    per_owner: dict[int, tuple[Any, dict]] = {}
    for name, parts in modules.items():
        module = index.get(name)
        if module is None or id(module) not in owners:
            raise ValueError(f"module {name} is not in this {family.label} model (wrong model family?)")
        owner, path = owners[id(module)]
        per_owner.setdefault(id(owner), (owner, {}))[1][path] = parts
    for owner, paths in per_owner.values():
        inject(owner, paths, adapter)
