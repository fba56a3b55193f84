"""Checking a LoRA file against its base model: does every key land on a module, and does it change the image?

"My LoRA does nothing in A1111" almost always means its keys do not match
the names the loader expects, so the loader silently skips them. ``verify``
answers that before anyone shares the file:

1. **coverage** -- every LoRA module in the file is matched to a Linear or
   Conv2d module of the base model under the names kohya's sd-scripts uses
   for that family (or, for a diffusers/peft file, the module paths); the
   unmatched ones are listed;
2. **shapes and values** -- each module's down/up ranks agree, fit the base
   module's in/out features, its alpha is a positive finite number, and no
   weight is NaN or infinite;
3. **loading** -- diffusers' own ``load_lora_weights`` reads the file;
4. **effect** -- an image at a fixed seed with the LoRA differs from the
   base model's by a measured amount.

A file that maps to nothing, or changes nothing, fails.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from core.lora.module_names import _plain_modules, module_index, peft_index  # noqa: F401 - read from here too

KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
PEFT_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


@dataclass
class Verification:
    file: str
    family: str
    layout: str  # "kohya" or "diffusers"
    modules: int  # LoRA modules in the file
    matched: int
    unmatched: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # shape/alpha problems, load failures, no effect
    loads: bool | None = None  # diffusers' loader read it (None: not checked)
    warnings: list[str] = field(default_factory=list)  # loads, but not in every tool
    mean_change: float | None = None  # mean |LoRA - base| pixel difference, 0-255 (None: not measured)
    max_change: float | None = None

    @property
    def ok(self) -> bool:
        return self.matched > 0 and not self.unmatched and not self.problems and self.loads is not False

    def to_json(self) -> dict:
        return {"file": self.file, "family": self.family, "layout": self.layout, "ok": self.ok,
                "modules": self.modules, "matched": self.matched, "unmatched": list(self.unmatched),
                "problems": list(self.problems), "warnings": list(self.warnings), "loads": self.loads,
                "mean_change": self.mean_change,
                "max_change": self.max_change}

    def summary(self) -> str:
        head = "OK" if self.ok else "FAILED"
        lines = [f"{head}: {self.file} ({self.layout} layout, {self.family})",
                 f"modules: {self.matched} of {self.modules} map onto the base model"]
        lines += [f"  not found in the base model: {name}" for name in self.unmatched[:20]]
        if len(self.unmatched) > 20:
            lines.append(f"  ... and {len(self.unmatched) - 20} more")
        if self.loads is not None:
            lines.append(f"diffusers' loader: {'reads it' if self.loads else 'fails'}")
        if self.mean_change is not None:
            lines.append(f"image change at a fixed seed: mean {self.mean_change:.2f}, max {self.max_change:.0f} "
                         f"(of 255)")
        lines += [f"problem: {p}" for p in self.problems]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


# --------------------------------------------------------------------------
# names the base model offers


# UNet modules outside the attention and resnet blocks (kohya and diffusers names): ComfyUI and diffusers apply
# them, but sd-scripts' LoRA network has no slot for them, so A1111 extensions and tools built on it skip them.
_UNPLACEABLE = re.compile(r"lora_unet_(conv_in|conv_out|time_embedding|time_embed|add_embedding|label_emb"
                          r"|class_embedding|input_blocks_0_0|out_[02])(_|$)|unet\.(conv_in|conv_out|time_embedding"
                          r"|add_embedding|class_embedding)\.")


def _module_names(tensors: dict) -> list[str]:
    return sorted({k[: -len(s)] for k in tensors for s in KOHYA_SUFFIXES + PEFT_SUFFIXES if k.endswith(s)})


def placement_warnings(names: list[str]) -> list[str]:
    """A warning for a file whose modules sd-scripts-based tools cannot place (they load in ComfyUI/diffusers)."""
    odd = sorted({n for n in names if _UNPLACEABLE.match(n)})
    if not odd:
        return []
    return [f"{len(odd)} module(s) outside the UNet's blocks ({', '.join(odd[:4])}{', ...' if len(odd) > 4 else ''})"
            f" load in ComfyUI and diffusers, but sd-scripts-based tools (and A1111 extensions built on them) "
            f"skip them; leave them out of lora.target_modules for a file that works everywhere"]


def event(result: Verification, step: int):
    """The verification as a LoraVerified event (unmatched names first, at most ten)."""
    from core.events import LoraVerified

    problems = [f"not in the base model: {name}" for name in result.unmatched[:10]] + result.problems
    return LoraVerified(step, result.file, result.ok, result.modules, result.matched, problems,
                        result.mean_change, result.loads)


def verify_loaded(file: str | Path, unet, text_encoders, family) -> Verification:
    """The name and shape checks against models already in memory (used right after each export)."""
    from safetensors.torch import load_file

    tensors = load_file(str(file))
    layout, modules, unmatched, problems, matched = check_tensors(
        tensors, module_index(unet, text_encoders, family), peft_index(unet, text_encoders, family))
    result = Verification(str(file), family.name, layout, modules, matched, unmatched, problems)
    result.warnings = placement_warnings(_module_names(tensors))
    if matched == 0:
        result.problems.append("no LoRA module of the file maps onto the base model")
    return result


# --------------------------------------------------------------------------
# the checks


def check_tensors(tensors: dict[str, torch.Tensor], index_kohya, index_peft) -> tuple[str, int, list, list, int]:
    """(layout, modules, unmatched names, problems, matched) for a file's tensors."""
    from core.lora.adapters import is_lycoris

    if is_lycoris(tensors):
        return _check_lycoris(tensors, index_kohya)
    kohya = any(k.endswith(KOHYA_SUFFIXES) for k in tensors)
    suffixes = KOHYA_SUFFIXES if kohya else PEFT_SUFFIXES
    down_suffix, up_suffix = suffixes[0], suffixes[1]
    index = index_kohya if kohya else index_peft
    names = sorted({k[: -len(s)] for k in tensors for s in suffixes if k.endswith(s)})
    unmatched, problems, matched = [], [], 0
    for name in names:
        module = index.get(name)
        if module is None:
            unmatched.append(name)
            continue
        matched += 1
        down, up = tensors.get(name + down_suffix), tensors.get(name + up_suffix)
        if down is None or up is None:
            problems.append(f"{name}: has {'no down' if down is None else 'no up'} weight")
            continue
        problems += _shape_problems(name, module, down, up)
        if kohya:
            alpha = tensors.get(name + ".alpha")
            if alpha is not None and (alpha.numel() != 1 or not math.isfinite(float(alpha)) or float(alpha) <= 0):
                problems.append(f"{name}: alpha {alpha.flatten()[:1].tolist()} is not a positive number")
    problems += nonfinite_problems(tensors)
    return ("kohya" if kohya else "diffusers"), len(names), unmatched, problems, matched


def _check_lycoris(tensors: dict[str, torch.Tensor], index) -> tuple[str, int, list, list, int]:
    """The checks of ``check_tensors`` for a LoHa / LoKr file: each module's update is computed as its
    readers compute it, and must have the base weight's size."""
    from core.lora.adapters import delta, group_modules

    modules = group_modules(tensors)
    unmatched, problems, matched = [], [], 0
    for name, parts in sorted(modules.items()):
        module = index.get(name)
        if module is None:
            unmatched.append(name)
            continue
        matched += 1
        alpha = parts.get("alpha")
        if alpha is not None and (alpha.numel() != 1 or not math.isfinite(float(alpha)) or float(alpha) <= 0):
            problems.append(f"{name}: alpha {alpha.flatten()[:1].tolist()} is not a positive number")
        try:
            delta(parts, module.weight.shape)
        except (ValueError, RuntimeError, KeyError) as exc:
            problems.append(f"{name}: {exc}".split("\n")[0])
    problems += nonfinite_problems(tensors)
    return "lycoris", len(modules), unmatched, problems, matched


def nonfinite_problems(tensors: dict[str, torch.Tensor]) -> list[str]:
    """One problem naming how many values are NaN or infinite (a diverged run), or none."""
    from core.lora.lora_io import nonfinite_counts

    counts = nonfinite_counts(tensors)
    if not counts:
        return []
    names = ", ".join(list(counts)[:3]) + (", ..." if len(counts) > 3 else "")
    return [f"{sum(counts.values()):,} weight value(s) are NaN or infinite, in {len(counts)} of {len(tensors)} "
            f"tensors ({names}): the training diverged; this file would turn images black or to noise"]


def _shape_problems(name: str, module, down: torch.Tensor, up: torch.Tensor) -> list[str]:
    rank = down.shape[0]
    if up.shape[1] != rank:
        return [f"{name}: down has rank {rank} but up has {up.shape[1]}"]
    if isinstance(module, torch.nn.Linear):
        want_in, want_out = module.in_features, module.out_features
    else:
        want_in, want_out = module.in_channels, module.out_channels
    if down.shape[1] != want_in or up.shape[0] != want_out:
        return [f"{name}: LoRA is {down.shape[1]}->{up.shape[0]} but the base module is {want_in}->{want_out}"]
    return []


def verify(file: str | Path, model: str, revision: str = "", family: str = "auto", image: bool = True,
           prompt: str = "a photo", seed: int = 0, steps: int = 4, size: int = 0, scale: float = 1.0,
           device: str | None = None, dtype=None, offload: bool = False, pipe=None) -> Verification:
    """Check ``file`` against the base ``model`` (see the module docstring).

    The model is loaded once, as the Prompt tab loads it (fp16 on a GPU, fp32
    on a CPU, unless ``dtype`` says otherwise; ``offload``: layer by layer
    from system RAM on a GPU too small for it), and serves both the name
    checks and the images; or ``pipe`` is that model, already loaded (with no
    LoRA in it; the file's is added for the image check).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from core.base.families import FamilyError, detect_family, get_family
    from core.base.models import ModelError, resolve_model_path
    from core.base.sample import load_pipeline
    from core.lora.lora_io import LoraFileError

    path = Path(file)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} does not exist")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise LoraFileError(f"{path} cannot be read as a .safetensors LoRA file: {exc}") from None
    folder = resolve_model_path(model, revision)
    try:
        kind = detect_family(folder) if family == "auto" else get_family(family)
    except FamilyError as exc:
        raise ModelError(str(exc)) from None
    if pipe is None:
        pipe = load_pipeline(str(folder), device=device, dtype=dtype, offload=offload)
    encoders = [getattr(pipe, name) for name in kind.text_encoders]
    denoiser = getattr(pipe, kind.denoiser, None)
    if denoiser is None or type(pipe).__name__ != kind.pipeline_class:
        raise ModelError(f"{folder} is a {type(pipe).__name__} model, not {kind.label}: check model.family")
    layout, modules, unmatched, problems, matched = check_tensors(
        tensors, module_index(denoiser, encoders, kind), peft_index(denoiser, encoders, kind))
    result = Verification(str(path), kind.name, layout, modules, matched, unmatched, problems)
    result.warnings = placement_warnings(_module_names(tensors))
    if matched == 0:
        result.problems.append("no LoRA module of the file maps onto this base model: the LoRA would do nothing "
                               "(wrong model family, or names no loader understands)")
    elif image:
        _check_effect(result, pipe, kind, folder, path, prompt, seed, steps, size, scale)
    return result


def _check_effect(result: Verification, pipe, kind, folder: Path, path: Path, prompt: str, seed: int, steps: int,
                  size: int, scale: float) -> None:
    import numpy as np

    from core.base.models import native_resolution
    from core.base.sample import generate
    from core.lora.preview import apply_lora

    side = size or min(kind.native_resolution, native_resolution(folder) or kind.native_resolution)
    before = np.asarray(generate(pipe, prompt, seed=seed, steps=steps, width=side, height=side), dtype=np.float64)
    try:
        apply_lora(pipe, path, scale)
    except Exception as exc:  # diffusers raises many kinds for a file it cannot read
        result.loads = False
        result.problems.append(f"diffusers' load_lora_weights cannot read it: {type(exc).__name__}: {exc}")
        return
    result.loads = True
    after = np.asarray(generate(pipe, prompt, seed=seed, steps=steps, width=side, height=side), dtype=np.float64)
    diff = np.abs(after - before)
    result.mean_change, result.max_change = float(diff.mean()), float(diff.max())
    if result.max_change < 1.0:
        result.problems.append(f"the LoRA does not change the image at seed {seed} (largest pixel difference "
                               f"{result.max_change:.2f} of 255): it was not trained, or its weights are zero")
