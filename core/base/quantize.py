"""A quantised frozen UNet or transformer (QLoRA): its linear layers stored in 8 or 4 bits by bitsandbytes.

diffusers' own bitsandbytes loader refuses to run without a GPU, so the
layers are swapped here with bitsandbytes' modules (``Linear8bitLt`` for
LLM.int8, ``Linear4bit`` for NF4 with double quantisation), which quantise
when the model moves to its device and run on CUDA and on the CPU. The LoRA
that peft adds on top trains in fp32; its parameter names are those of the
unquantised model, so the saved file is the same and loads on the full UNet.

Only the transformer blocks' linear layers are quantised: the time and
conditioning embeddings (and a flow transformer's input and final layers)
are small and steer every layer, so they stay exact,
and so does a layer whose input is not a whole number of quantisation blocks
(64 values; every layer of the real models is, tiny test models have some
that are not). The planner (core.training.plan) counts the same layers.

fp8 storage ("fp8") keeps the weights of every linear and convolution layer
(but the embeddings and the first and last convolutions) in
``float8_e4m3fn`` and casts them to the compute dtype inside the layer's
own autograd function, forward and backward, so no full-precision copy
outlives a layer call. diffusers' layerwise casting is not used for this:
it swaps the weights in place, which the tensors autograd saved for the
backward pass and gradient checkpointing's recomputation do not survive
("Recomputed values ... have different metadata").
"""

from __future__ import annotations

import torch

KEEP_EXACT = ("time_embedding", "add_embedding", "class_embedding", "time_proj", "add_time_proj",
              # the flow transformers' embeddings and final layer (outside their blocks)
              "time_text_embed", "x_embedder", "context_embedder", "pos_embed", "norm_out")
KEEP_EXACT_FP8 = (*KEEP_EXACT, "conv_in", "conv_out")
BLOCK = 64  # NF4 quantisation block (bitsandbytes' default)


def quantizable(name: str, module: torch.nn.Module) -> bool:
    return (type(module) is torch.nn.Linear and module.in_features % BLOCK == 0 and name != "proj_out"
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



# ------------------------------------------------------------ fp8 storage


def fp8_castable(name: str, module: torch.nn.Module) -> bool:
    return (type(module) in (torch.nn.Linear, torch.nn.Conv2d, FP8Linear, FP8Conv2d) and name != "proj_out"
            and not any(part in KEEP_EXACT_FP8 for part in name.split(".")))


class _LinearFP8(torch.autograd.Function):
    """y = x W^T + b with W stored in fp8; backward recomputes W in the compute dtype for the input's
    gradient (W is frozen: no weight gradient)."""

    @staticmethod
    def forward(ctx, x, weight, bias, dtype):
        ctx.save_for_backward(weight)
        ctx.dtype, ctx.x_dtype = dtype, x.dtype
        return torch.nn.functional.linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        grad_x = grad.to(ctx.dtype) @ weight.to(ctx.dtype) if ctx.needs_input_grad[0] else None
        return (None if grad_x is None else grad_x.to(ctx.x_dtype)), None, None, None


class _Conv2dFP8(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, dtype, stride, padding, dilation, groups):
        ctx.save_for_backward(weight)
        ctx.dtype, ctx.x_dtype, ctx.shape = dtype, x.dtype, x.shape
        ctx.conv = (stride, padding, dilation, groups)
        return torch.nn.functional.conv2d(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype),
                                          stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.nn.grad.conv2d_input(ctx.shape, weight.to(ctx.dtype), grad.to(ctx.dtype), *ctx.conv)
            grad_x = grad_x.to(ctx.x_dtype)
        return grad_x, None, None, None, None, None, None, None


class FP8Linear(torch.nn.Linear):
    """A frozen linear layer whose weight is stored in fp8 (``compute_dtype`` set by ``store_in_fp8``)."""

    compute_dtype = torch.bfloat16

    def forward(self, x):
        return _LinearFP8.apply(x, self.weight, self.bias, self.compute_dtype)


class FP8Conv2d(torch.nn.Conv2d):
    compute_dtype = torch.bfloat16

    def forward(self, x):
        if self.padding_mode != "zeros":
            raise ValueError(f"fp8 storage supports zero-padded convolutions only, not {self.padding_mode!r}")
        return _Conv2dFP8.apply(x, self.weight, self.bias, self.compute_dtype, self.stride, self.padding,
                                self.dilation, self.groups)


def store_in_fp8(model: torch.nn.Module, compute_dtype: torch.dtype) -> int:
    """Keep the frozen linear and convolution weights of ``model`` in fp8 (see the module docstring);
    returns how many weights are stored so. Call before the LoRA is added."""
    count = 0
    for name, module in list(model.named_modules()):
        if not fp8_castable(name, module):
            continue
        module.__class__ = FP8Linear if isinstance(module, torch.nn.Linear) else FP8Conv2d
        module.compute_dtype = compute_dtype
        module.weight.data = module.weight.data.to(torch.float8_e4m3fn)
        count += module.weight.numel()
    return count
