"""Blocks by the names people know them by: which to train, and a rank or learning-rate weight per block.

SD 1.x/2.x/SDXL UNets use the names of A1111's LoRA Block Weight and
sd-scripts (the original model's ``input_blocks.N`` / ``middle_block`` /
``output_blocks.N``): ``IN00``...``IN11``, ``MID``, ``OUT00``...``OUT11`` (SDXL
has IN00-IN08 and OUT00-OUT08). The transformers are numbered per stack:
``double.N`` and ``single.N`` (FLUX.1, FLUX.2), ``joint.N`` (SD 3.5),
``layer.N``, ``noise_refiner.N``, ``context_refiner.N`` (Z-Image).

A setting names blocks one by one (``IN04``), as a range (``IN04-IN08``,
``single.0-19``) or with ``*`` (``double.*``); rank and weight settings add
``=value`` (``OUT00-OUT02=8``). A name that fits no block of the model is an
error that lists the model's blocks.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

import torch

_STACKS = {"transformer_blocks": "double", "single_transformer_blocks": "single", "layers": "layer",
           "noise_refiner": "noise_refiner", "context_refiner": "context_refiner"}
# The adapter's own parameters inside a layer: LoRA's lora_A/lora_B, DoRA's lora_dora_scale, LoHa's and LoKr's.
_ADAPTER_PART = re.compile(r"\.(lora_\w+|hada_\w+|lokr_\w+)(\.|$)")


class BlockError(ValueError):
    """A block setting that fits no block of the model, or a value that is not a number."""


def block_of(family, path: str, denoiser_config) -> str | None:
    """The block a module of the denoiser belongs to (``IN04``, ``double.3``...); None outside the blocks."""
    if not family.flow:
        from core.lora.kohya_names import ldm_unet_path

        try:
            parts = ldm_unet_path(path, denoiser_config).split(".")
        except ValueError:
            return None
        if parts[0] == "input_blocks":
            return f"IN{int(parts[1]):02d}"
        if parts[0] == "output_blocks":
            return f"OUT{int(parts[1]):02d}"
        return "MID" if parts[0] == "middle_block" else None
    head, _, rest = path.partition(".")
    index = rest.split(".")[0]
    stack = _STACKS.get(head)
    if stack == "double" and family.name == "sd3":
        stack = "joint"
    return f"{stack}.{index}" if stack and index.isdigit() else None


def module_of(parameter_name: str) -> str:
    """The module path of an adapter parameter (``...to_q.lora_A.default.weight`` -> ``...to_q``)."""
    match = _ADAPTER_PART.search(parameter_name)
    return parameter_name[: match.start()] if match else parameter_name


def matches(spec: str, block: str) -> bool:
    """Whether ``block`` is named by ``spec``: itself, a range of one stack (``IN04-IN08``, ``single.0-9``) or
    a pattern with ``*``."""
    spec = spec.strip()
    if "-" in spec and "*" not in spec:
        first, _, last = spec.partition("-")
        low, high = _split(first), _split(last.strip())
        here = _split(block)
        if low is not None and high is not None and not high[0]:  # "single.0-9": the stack named once
            high = (low[0], high[1])
        if low is None or high is None or here is None or not (low[0] == high[0] == here[0]):
            return False
        return low[1] <= here[1] <= high[1]
    return fnmatch.fnmatchcase(block, spec)


def _split(name: str) -> tuple[str, int] | None:
    match = re.fullmatch(r"(.*?)(\d+)", name.strip())
    return (match.group(1), int(match.group(2))) if match else None


def parse_values(specs: list[str], key: str) -> list[tuple[str, float]]:
    """``["OUT00-OUT02=8", ...]`` -> ``[("OUT00-OUT02", 8.0), ...]``."""
    out = []
    for spec in specs:
        name, sep, value = spec.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = None
        if not sep or not name.strip() or number is None:
            raise BlockError(f"{key}: {spec!r} is not BLOCKS=NUMBER (e.g. 'OUT00-OUT02=8' or 'single.*=0.5')")
        out.append((name.strip(), number))
    return out


@dataclass
class BlockPlan:
    """What the block settings make of the targets: the module paths that train, their ranks and alphas where
    they differ, and the learning-rate weight of each block that has one."""

    paths: list[str]
    ranks: dict[str, int] = field(default_factory=dict)
    alphas: dict[str, float] = field(default_factory=dict)
    lr_weights: dict[str, float] = field(default_factory=dict)  # block -> weight


def plan_blocks(family, denoiser, targets: list[str], lora) -> BlockPlan:
    """Apply ``lora.blocks``, ``lora.block_ranks`` and ``lora.block_lr_weights`` to the layers ``targets`` names
    (peft's names or suffixes, or full paths). A block rank keeps the alpha/rank ratio (alpha scales with it)."""
    config = denoiser.config
    layers = [path for path, module in denoiser.named_modules()
              if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and "lora_" not in path
              and any(path == t or path.endswith("." + t) for t in targets)]
    blocks = {path: block_of(family, path, config) for path in layers}
    known = sorted({b for b in blocks.values() if b}, key=lambda b: (_split(b) or (b, 0)))
    listing = ", ".join(known[:40]) + (", ..." if len(known) > 40 else "")

    def chosen(spec: str, key: str) -> set[str]:
        hit = {b for b in known if matches(spec, b)}
        if not hit:
            raise BlockError(f"{key}: {spec!r} names no block of this {family.label} model; its blocks with "
                             f"trained layers are {listing}")
        return hit

    keep = set(known)
    if lora.blocks:
        keep = set().union(*(chosen(spec, "lora.blocks") for spec in lora.blocks))
    weights: dict[str, float] = {}
    for spec, value in parse_values(lora.block_lr_weights, "lora.block_lr_weights"):
        for block in chosen(spec, "lora.block_lr_weights"):
            weights[block] = value
    keep -= {block for block, weight in weights.items() if weight == 0}  # weight 0: the block does not train
    if not keep:
        raise BlockError("lora.blocks / lora.block_lr_weights leave no block to train")
    plan = BlockPlan([p for p in layers if blocks[p] in keep], lr_weights={b: w for b, w in weights.items() if w})
    for spec, value in parse_values(lora.block_ranks, "lora.block_ranks"):
        if value < 1 or value != int(value):
            raise BlockError(f"lora.block_ranks: {spec}={value:g}: a rank is a whole number of at least 1")
        for block in chosen(spec, "lora.block_ranks"):
            for path in plan.paths:
                if blocks[path] == block:
                    plan.ranks[path] = int(value)
                    plan.alphas[path] = lora.alpha * value / lora.rank
    return plan


def lr_weight(family, denoiser_config, parameter_name: str, weights: dict[str, float]) -> float:
    """The learning-rate weight of one adapter parameter of the denoiser (1 outside weighted blocks)."""
    if not weights:
        return 1.0
    return weights.get(block_of(family, module_of(parameter_name), denoiser_config), 1.0)


def weight_function(base):
    """``param_groups``' block weight (parameter name -> weight) for a loaded model's block plan; None when
    no block has a learning-rate weight."""
    weights = base.block_plan.lr_weights if base.block_plan else {}
    if not weights:
        return None
    return lambda name: lr_weight(base.family, base.denoiser.config, name, weights)
