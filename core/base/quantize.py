"""A quantised frozen UNet (QLoRA): its linear layers stored in 8 or 4 bits by bitsandbytes.

diffusers' own bitsandbytes loader refuses to run without a GPU, so the
layers are swapped here with bitsandbytes' modules (``Linear8bitLt`` for
LLM.int8, ``Linear4bit`` for NF4 with double quantisation), which quantise
when the model moves to its device and run on CUDA and on the CPU. The LoRA
that peft adds on top trains in fp32; its parameter names are those of the
unquantised model, so the saved file is the same and loads on the full UNet.

Only the transformer blocks' linear layers are quantised: the time and
conditioning embeddings are small and steer every layer, so they stay exact,
and so does a layer whose input is not a whole number of quantisation blocks
(64 values; every layer of the real models is, tiny test models have some
that are not). The planner (core.training.plan) counts the same layers.

fp8 storage through diffusers' layerwise casting is not offered for
training: it swaps each layer's weights between fp8 and the compute dtype in
place, so the tensors autograd saved for the backward pass (and the
recomputation of gradient checkpointing) see the fp8 weights again
("Recomputed values ... have different metadata").
"""

from __future__ import annotations

import torch

KEEP_EXACT = ("time_embedding", "add_embedding", "class_embedding", "time_proj", "add_time_proj")
BLOCK = 64  # NF4 quantisation block (bitsandbytes' default)


def quantizable(name: str, module: torch.nn.Module) -> bool:
    return (type(module) is torch.nn.Linear and module.in_features % BLOCK == 0
            and not any(part in KEEP_EXACT for part in name.split(".")))


def quantize_linears(model: torch.nn.Module, kind: str, compute_dtype: torch.dtype) -> int:
    """Replace the frozen linear layers of ``model`` by bitsandbytes ones ("int8" or "nf4"); returns how
    many. The weights are quantised when the model is next moved with ``.to(device)``."""
    import bitsandbytes as bnb

    if kind not in ("int8", "nf4"):
        raise ValueError(f"model.quantize = {kind!r}: use 'none', 'int8' or 'nf4'")
    targets = [(name, module) for name, module in model.named_modules() if quantizable(name, module)]
    for name, linear in targets:
        weight = linear.weight.data
        if kind == "nf4":
            layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                      compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True,
                                      device="meta")
            layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", blocksize=BLOCK,
                                             compress_statistics=True, module=layer)
            # On CPUs with AVX512-BF16, bitsandbytes repacks the weight for inference the first time the
            # layer runs in eval mode and then uses the inference kernel for training too, which breaks the
            # backward pass after the first validation. Training alternates, so keep the training layout.
            layer.support_avx512bf16_for_cpu = False
        else:
            layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                        has_fp16_weights=False, threshold=6.0, device="meta")
            layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        if linear.bias is not None:
            layer.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    return len(targets)

