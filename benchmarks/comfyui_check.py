"""Apply the app's LoRA / LoCon / LoHa / LoKr files with ComfyUI's own code and compare with the trained weights.

Not part of the test run (it needs a ComfyUI checkout, which CI does not have):

    pip install einops
    python benchmarks/comfyui_check.py --comfyui /path/to/ComfyUI

For each kind (DoRA: LoRA with the app's input-axis magnitudes), a tiny SD 1.x,
SDXL and FLUX.1 model gets a non-zero adapter (peft, as training makes it); the
file the app writes is read by ComfyUI's
``comfy.lora.load_lora`` and applied by its ``calculate_weight`` to the base
weights, and the result is compared with the weights peft's own merge gives.
SD names are mapped one to one (the name rules are tested in
tests/test_kohya_names.py); FLUX's ``lycoris_`` names go through ComfyUI's own
diffusers-to-original map (``comfy.utils.flux_to_diffusers``) onto the fused
original weights. Prints the largest relative error and any key ComfyUI left
unread.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import logging
import sys
import types

import torch


class _Stub(types.ModuleType):
    """Stands in for packages ComfyUI's model code imports but its LoRA code never calls."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        module = _Stub(f"{self.__name__}.{name}")
        sys.modules[module.__name__] = module
        return module

    def __call__(self, *args, **kwargs):
        return _Stub("call")


class _StubFinder:
    NAMES = ("torchvision", "torchsde", "av", "kornia", "spandrel", "scipy", "torchaudio", "comfy_kitchen",
             "comfy_aimdo")

    def __init__(self):
        import importlib.util

        self.missing = {name for name in self.NAMES if importlib.util.find_spec(name) is None}

    def find_spec(self, name, path, target=None):
        return importlib.machinery.ModuleSpec(name, self) if name.split(".")[0] in self.missing else None

    def create_module(self, spec):
        return _Stub(spec.name)

    def exec_module(self, module):
        pass


def import_comfyui(root: str):
    sys.path.insert(0, root)
    sys.meta_path.insert(0, _StubFinder())
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.lora
    import comfy.utils

    return comfy


def _patches(loaded: dict) -> dict[str, list]:
    out: dict[str, list] = {}
    for key, adapter in loaded.items():
        offset = None
        if isinstance(key, tuple):
            key, offset = key[0], key[1]
        out.setdefault(key, []).append((1.0, adapter, 1.0, offset, None))
    return out


def prepare_sd(kind: str, family: str, shape: str):
    """A tiny model's adapter file, ComfyUI's load map for it, and per weight (base, base + trained update)."""
    from core.base.families import get_family
    from core.base.tiny import build_pipeline
    from core.lora.adapters import conv_targets, peft_config
    from core.lora.lora_io import kohya_state_dict
    from core.lora.verify import module_index

    pipe = build_pipeline(family=shape)
    unet = pipe.unet
    torch.manual_seed(3)
    dora = kind == "dora"
    conv = [] if dora else conv_targets(unet)
    unet.add_adapter(peft_config("lora" if dora else kind, 4, 16.0, ["to_q", "to_k", "to_v", "to_out.0"],
                                 conv=conv, conv_rank=2, conv_alpha=4.0, init=False))
    if dora:
        _add_magnitudes(unet)
    tensors = kohya_state_dict(unet, None, family=family, dtype=torch.float32)
    fam = get_family(family)
    index = module_index(unet, [getattr(pipe, n) for n in fam.text_encoders], fam)
    layers = {id(m.get_base_layer()): m for m in unet.modules() if hasattr(m, "get_delta_weight")}
    names = {k.split(".")[0] for k in tensors}
    weights = {}
    for name in names:
        base = index[name].weight.detach().float().clone()
        layer = layers[id(index[name])]
        weights[name] = (base, _effective(layer) if dora else base + layer.get_delta_weight("default").float())
    return tensors, {n: n for n in names}, weights


def _add_magnitudes(model) -> None:
    """DoRA on every LoRA layer, its magnitudes moved away from the weights' norms (as training moves them)."""
    from core.lora.dora import add_dora

    for magnitude in add_dora(model):
        with torch.no_grad():
            magnitude.mul_(1 + 0.5 * torch.rand_like(magnitude))


def _effective(layer) -> torch.Tensor:
    """The weight a linear layer applies, read from its outputs (W x + b for x the unit vectors)."""
    base = layer.get_base_layer()
    with torch.no_grad():
        out = layer(torch.eye(base.in_features))
    return (out - (base.bias if base.bias is not None else 0)).T.float()


def prepare_flux(kind: str):
    """The same for FLUX.1: the file keeps diffusers' names; the weights are the original model's fused ones."""
    from core.base.flow_checkpoint import original_state_dict
    from core.base.tiny_flow import build_flux
    from core.lora.adapters import peft_config
    from core.lora.lora_io import kohya_state_dict

    transformer = build_flux().transformer
    base_weights = original_state_dict(transformer, "flux", torch.float32)
    torch.manual_seed(3)
    dora = kind == "dora"
    transformer.add_adapter(peft_config("lora" if dora else kind, 4, 16.0, ["to_q", "to_k", "to_v", "proj_mlp"],
                                        init=False))
    if dora:
        _add_magnitudes(transformer)
    tensors = kohya_state_dict(transformer, None, family="flux", dtype=torch.float32)
    if dora:
        from core.lora.dora import fuse

        fuse(transformer, "default")  # W' per layer, as the SD cases read it from the layers' outputs
    else:
        transformer.fuse_lora(lora_scale=1.0)
    transformer.unload_lora()  # the fused weights stay
    want = original_state_dict(transformer, "flux", torch.float32)
    config = transformer.config
    mmdit = {"depth": config.num_layers, "depth_single_blocks": config.num_single_layers,
             "hidden_size": config.num_attention_heads * config.attention_head_dim}
    weights = {key: (base_weights[key], want[key]) for key in base_weights}
    return tensors, mmdit, weights


def compare(comfy, tensors, to_load, weights) -> tuple[float, int, int]:
    """(worst relative error, modules, modules ComfyUI did not map) with ComfyUI's reader and patcher."""
    names = {k.split(".")[0] for k in tensors}
    loaded = comfy.lora.load_lora(tensors, {n: to_load[n] for n in names if n in to_load})
    worst = 0.0
    for key, patches in _patches(loaded).items():
        base, want = weights[key]
        merged = comfy.lora.calculate_weight(patches, base.clone(), key)
        worst = max(worst, float((merged - want).abs().max() / (want - base).abs().max()))
    return worst, len(names), len([n for n in names if n not in to_load])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", required=True, help="a ComfyUI checkout (the folder holding comfy/)")
    args = parser.parse_args()
    cases = []  # every model is built before ComfyUI (and its import stand-ins) is imported
    for kind in ("locon", "loha", "lokr", "dora"):
        for family, shape in (("sd1", "sd15"), ("sdxl", "sdxl")):
            cases.append((kind, family, *prepare_sd(kind, family, shape)))
        if kind != "locon":
            cases.append((kind, "flux", *prepare_flux(kind)))
    comfy = import_comfyui(args.comfyui)
    unread: list[str] = []

    class Unread(logging.Handler):
        def emit(self, record):
            if "lora key not loaded" in record.getMessage():
                unread.append(record.getMessage())

    logging.getLogger().addHandler(Unread())
    print(f"{'kind':6} {'model':6} {'modules':>7} {'worst relative error':>21}  keys ComfyUI did not read")
    for kind, family, tensors, to_load, weights in cases:
        if family == "flux":
            to_load = {"lycoris_" + key[: -len(".weight")].replace(".", "_"): target
                       for key, target in comfy.utils.flux_to_diffusers(to_load).items() if key.endswith(".weight")}
        unread.clear()
        worst, count, unmapped = compare(comfy, tensors, to_load, weights)
        print(f"{kind:6} {family:6} {count:7} {worst:21.2e}  {len(unread) + unmapped}")


if __name__ == "__main__":
    main()
