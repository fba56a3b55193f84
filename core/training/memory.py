"""GPU memory of a training step, measured without a GPU and without the memory.

The model is built on the meta device with its LoRA, materialised under
``FakeTensorMode`` (tensors with shapes and dtypes but no data), and one
training step runs through it: forward, loss, backward. A dispatch mode counts
the bytes of every storage an operation creates and subtracts them when the
storage dies, keeping the peak. That is the memory the step allocates on a
GPU up to what fake tensors cannot see: the CUDA context, the allocator's
fragmentation, and cuDNN/cuBLAS/attention workspaces (CPU kernels stand in
for the GPU's). The planner adds those as a stated margin
(``core.training.plan``).

Measurements cost seconds per configuration and are the ground truth the
planner's fast estimate is fitted to and tested against; the GPU benchmark
(benchmarks/bench_memory.py --cuda) compares both with
``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

import torch

from core.precision import torch_dtype

GiB = 2**30


@dataclass(frozen=True)
class StepShape:
    """What a training step's memory depends on, besides the architecture."""

    resolution: int = 512  # training pixels per side (a bucket of about resolution² pixels)
    batch: int = 1
    precision: str = "bf16"  # train.mixed_precision: frozen weights and compute in this dtype
    checkpointing: bool = True
    rank: int = 16
    targets: tuple[str, ...] = ()  # empty: the family's default set
    train_text_encoder: bool = False
    text_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")
    adapter: str = "lora"  # lora.type
    conv_rank: int = 0
    lokr_factor: int = -1

    @property
    def latent_tokens(self) -> int:
        return (self.resolution // 8) ** 2


def coefficient_key(shape: StepShape) -> str:
    """The table row a step's activations come from (what changes them more than a few percent)."""
    width = 4 if shape.precision == "no" else 2
    return f"{width}B-ckpt{int(shape.checkpointing)}-te{int(shape.train_text_encoder)}"


@dataclass
class StepMemory:
    """Bytes of one training step's parts, as fake tensors count them."""

    unet_weights: int  # frozen, in the compute dtype
    text_weights: int  # the text encoders' frozen weights (on the card only when trained or not cached)
    lora: int  # trainable LoRA weights, fp32 (UNet and, if trained, text encoders)
    lora_params: int  # how many
    step: int  # the forward/backward's own peak on top of the weights: activations and gradients

    @property
    def gradients(self) -> int:
        return self.lora


class _StorageCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts live bytes of the storages that operations create (views share theirs), and the peak."""

    def __init__(self, known: list[torch.Tensor]):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()
        for tensor in known:  # weights and inputs exist before the step: not the step's own memory
            self._seen.add(id(tensor.untyped_storage()))
        self._keep = [t.untyped_storage() for t in known]  # keep their ids from being reused

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._seen:
            return
        self._seen.add(key)
        size = storage.nbytes()
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, size)

    def _free(self, key: int, size: int) -> None:
        self.live -= size
        self._seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for item in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(item, torch.Tensor):
                self._track(item)
        return out


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def add_lora_meta(model, targets, rank: int, adapter: str = "lora", conv_rank: int = 0,
                  lokr_factor: int = -1) -> list[torch.nn.Parameter]:
    """The engine's adapter (``lora.type``; LoCon's convolutions at ``conv_rank``) on a meta-device model;
    returns the trainable parameters."""
    from core.lora.adapters import add_adapter, conv_targets, peft_config

    conv = conv_targets(model) if conv_rank and hasattr(model, "conv_in") else []
    config = peft_config(adapter, rank, float(rank), list(targets), conv=conv, conv_rank=conv_rank,
                         conv_alpha=float(conv_rank or 1), lokr_factor=lokr_factor)
    add_adapter(model, config)
    return [p for p in model.parameters() if p.requires_grad]


def measure_step(arch, shape: StepShape) -> StepMemory:
    """One training step of ``arch`` (``core.base.architecture.Architecture``) on fake tensors.

    Latents and (unless the text encoder is trained) text embeddings are the
    cached ones the engine feeds; with ``train_text_encoder`` the text
    encoders run forward and backward as part of the step.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    dtype = torch_dtype(shape.precision)
    unet, encoders = _step_models(arch, shape, dtype)
    with FakeTensorMode(allow_non_fake_inputs=True):
        lora, frozen_unet, frozen_text = _materialise(unet, encoders, "cpu")
        inputs = _step_inputs(arch, shape, dtype, unet, encoders, "cpu")
        counter = _StorageCounter([*frozen_unet, *frozen_text, *lora, *inputs.values()])
        with counter:
            _forward_backward(arch, shape, dtype, unet, encoders, inputs)
    return StepMemory(tensor_bytes(frozen_unet), tensor_bytes(frozen_text), tensor_bytes(lora),
                      sum(p.numel() for p in lora), counter.peak)


def measure_step_cuda(arch, shape: StepShape) -> StepMemory:
    """The same step on the GPU for real (weights uninitialised: memory does not depend on values), with
    ``step`` from ``torch.cuda.max_memory_allocated`` above what the weights and inputs hold."""
    dtype = torch_dtype(shape.precision)
    unet, encoders = _step_models(arch, shape, dtype)
    lora, frozen_unet, frozen_text = _materialise(unet, encoders, "cuda")
    inputs = _step_inputs(arch, shape, dtype, unet, encoders, "cuda")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    _forward_backward(arch, shape, dtype, unet, encoders, inputs, device="cuda")
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    result = StepMemory(tensor_bytes(frozen_unet), tensor_bytes(frozen_text), tensor_bytes(lora),
                        sum(p.numel() for p in lora), peak)
    del unet, encoders, inputs, lora, frozen_unet, frozen_text
    torch.cuda.empty_cache()
    return result


def cuda_step_seconds(arch, shape: StepShape, repeats: int = 5) -> float:
    """Median seconds of a real training step on the GPU (forward, backward; uninitialised weights), after
    two warm-up steps."""
    import statistics
    import time

    dtype = torch_dtype(shape.precision)
    unet, encoders = _step_models(arch, shape, dtype)
    lora, _, _ = _materialise(unet, encoders, "cuda")
    for param in lora:
        torch.nn.init.normal_(param, std=0.01)
    inputs = _step_inputs(arch, shape, dtype, unet, encoders, "cuda")
    times = []
    for _ in range(repeats + 2):
        torch.cuda.synchronize()
        start = time.perf_counter()
        _forward_backward(arch, shape, dtype, unet, encoders, inputs, device="cuda")
        for param in lora:
            param.grad = None
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    del unet, encoders, inputs, lora
    torch.cuda.empty_cache()
    return statistics.median(times[2:])


def _step_models(arch, shape: StepShape, dtype):
    """The denoiser and text encoders on the meta device with the step's LoRA and checkpointing (a text
    encoder LoRA on the CLIP encoders only, as the engine trains it)."""
    from core.base.architecture import build_meta
    from core.base.families import get_family

    kind = get_family(arch.family)
    unet, encoders, _ = build_meta(arch, dtype)
    add_lora_meta(unet, kind.lora_targets(unet, list(shape.targets)), shape.rank, shape.adapter, shape.conv_rank,
                  shape.lokr_factor)
    trainable = [e for i, e in enumerate(encoders) if i in kind.trainable_text]
    if shape.train_text_encoder:
        for encoder in trainable:
            add_lora_meta(encoder, shape.text_targets, shape.rank, shape.adapter)
    if shape.checkpointing:
        unet.enable_gradient_checkpointing()
        if shape.train_text_encoder:
            for encoder in trainable:
                encoder.gradient_checkpointing_enable()
    return unet, encoders


def _materialise(unet, encoders, device: str):
    """Storage for every tensor on ``device`` (fake under FakeTensorMode); LoRA weights in fp32.
    Returns (trainable, frozen UNet tensors, frozen text encoder tensors)."""
    for module in (unet, *encoders):
        module.to_empty(device=device)
        for param in module.parameters():
            if param.requires_grad:
                param.data = torch.empty_like(param, dtype=torch.float32)
    lora = [p for m in (unet, *encoders) for p in m.parameters() if p.requires_grad]
    frozen_unet = [t for t in (*unet.parameters(), *unet.buffers()) if not t.requires_grad]
    frozen_text = [t for e in encoders for t in (*e.parameters(), *e.buffers()) if not t.requires_grad]
    return lora, frozen_unet, frozen_text


def _step_inputs(arch, shape: StepShape, dtype, unet, encoders, device: str) -> dict[str, torch.Tensor]:
    """Cached latents and text conditioning of a batch, shaped as the engine feeds them (token ids instead of
    text states when the text encoder trains)."""
    from types import SimpleNamespace

    from core.base.families import get_family

    kind = get_family(arch.family)
    b = shape.batch
    latent = kind.latent_shape(SimpleNamespace(**{"block_out_channels": (64,), "latent_channels": 4, **arch.vae}),
                               shape.resolution, shape.resolution)
    inputs = {"latents": torch.zeros(b, *latent, dtype=dtype, device=device),
              "timesteps": torch.zeros(b, dtype=torch.float32 if kind.flow else torch.long, device=device)}
    lengths = [n or 77 for n in kind.text_lengths(unet.config)]
    if shape.train_text_encoder:
        for i, length in enumerate(lengths):
            inputs[f"ids{i}"] = torch.zeros(b, length, dtype=torch.long, device=device)
        return inputs
    config = unet.config
    if kind.flow:
        seq = sum(lengths) if kind.name == "sd3" else lengths[-1]  # SD 3.5: CLIP's 77 then T5's in one sequence
        width = config.get("joint_attention_dim") or config.get("cap_feat_dim")  # Z-Image: the caption features
        inputs["hidden"] = torch.zeros(b, seq, width, dtype=dtype, device=device)
        if config.get("pooled_projection_dim"):
            inputs["pooled"] = torch.zeros(b, config.pooled_projection_dim, dtype=dtype, device=device)
        return inputs
    inputs["hidden"] = torch.zeros(b, 77, config.cross_attention_dim, dtype=dtype, device=device)
    if kind.pooled:
        inputs["pooled"] = torch.zeros(b, encoders[-1].config.projection_dim, dtype=dtype, device=device)
        inputs["time_ids"] = torch.zeros(b, 6, dtype=dtype, device=device)
    return inputs


def _cond(arch, shape: StepShape, encoders, inputs) -> dict:
    """The denoiser's conditioning: the cached states, or the text encoders run on the token ids."""
    from core.base.families import get_family

    kind = get_family(arch.family)
    if not shape.train_text_encoder:
        return {k: v for k, v in inputs.items() if k in ("hidden", "pooled", "time_ids")}
    for i, encoder in enumerate(encoders):
        encoder.train(i in kind.trainable_text)
    hidden, pooled = kind.encode(encoders, [inputs[f"ids{i}"] for i in range(len(encoders))])
    cond = {"hidden": hidden, "pooled": pooled} if pooled is not None and not kind.variable_text else {"hidden": hidden}
    if kind.pooled and not kind.flow:
        cond["time_ids"] = torch.zeros(hidden.shape[0], 6, dtype=hidden.dtype, device=hidden.device)
    return cond


def _forward_backward(arch, shape: StepShape, dtype, unet, encoders, inputs, device: str = "cpu") -> None:
    from core.base.families import get_family
    from core.lora.adapters import lycoris_layers

    unet.train()
    for model in (unet, *encoders):  # LoHa/LoKr layers in training mode draw a module-dropout number, which
        for _, layer in lycoris_layers(model):  # fake tensors cannot compare; with module_dropout 0 the
            layer.training = False  # computation is the same
    autocast = (torch.autocast(device, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext())
    with autocast:
        cond = _cond(arch, shape, encoders, inputs)
        prediction = get_family(arch.family).predict(unet, inputs["latents"], inputs["timesteps"], cond)
    loss = torch.nn.functional.mse_loss(prediction.float(), inputs["latents"].float())
    del prediction, cond
    loss.backward()


def step_flops(arch, shape: StepShape) -> int:
    """Floating-point operations of one training step (forward and backward; recomputation under
    checkpointing included), counted by torch's FlopCounterMode on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    dtype = torch_dtype(shape.precision)
    unet, encoders = _step_models(arch, shape, dtype)
    with FakeTensorMode(allow_non_fake_inputs=True):
        _materialise(unet, encoders, "cpu")
        inputs = _step_inputs(arch, shape, dtype, unet, encoders, "cpu")
        with FlopCounterMode(display=False) as counter:
            _forward_backward(arch, shape, dtype, unet, encoders, inputs)
    return counter.get_total_flops()


def measure_vae(arch, resolution: int, decode: bool) -> int:
    """Transient bytes of one fp32 VAE encode (caching) or decode (sample images) of a picture."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from core.base.architecture import build_meta

    _, _, vae = build_meta(arch)
    with FakeTensorMode(allow_non_fake_inputs=True):
        vae.to_empty(device="cpu")
        weights = [*vae.parameters(), *vae.buffers()]
        side = resolution // 8
        x = (torch.empty(1, vae.config.latent_channels, side, side) if decode
             else torch.empty(1, 3, resolution, resolution))
        counter = _StorageCounter([*weights, x])
        with counter, torch.no_grad():
            if decode:
                vae.decode(x)
            else:
                vae.encode(x).latent_dist.sample()
    return counter.peak


def measure_denoise(arch, resolution: int, precision: str = "bf16") -> int:
    """Transient bytes of one UNet step of sample generation: no gradients, batch 2 (with and without the
    prompt, for classifier-free guidance)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from core.base.architecture import build_meta
    from core.base.families import get_family

    dtype = torch_dtype(precision)
    unet, encoders, _ = build_meta(arch, dtype)
    shape = StepShape(resolution, 2, precision)
    with FakeTensorMode(allow_non_fake_inputs=True):
        unet.to_empty(device="cpu")
        inputs = _step_inputs(arch, shape, dtype, unet, encoders, "cpu")
        counter = _StorageCounter([*unet.parameters(), *unet.buffers(), *inputs.values()])
        with counter, torch.no_grad():
            get_family(arch.family).predict(unet, inputs["latents"], inputs["timesteps"],
                                            _cond(arch, shape, encoders, inputs))
    return counter.peak


def calibrate(arch, progress=lambda text: None) -> dict:
    """The planner's coefficients for ``arch``, from measurements at half and full native resolution.

    Per row (element width, checkpointing, text encoder trained): ``[c, a]`` with a step's activations
    and gradients = batch x (c + a*T) for T latent tokens per picture (c: what does not grow with the
    picture, such as the text's keys and values; attention is memory-efficient, so nothing grows with
    T squared). ``vae_encode``/``vae_decode``: bytes per latent token of one fp32 encode/decode;
    ``denoise``: of one guided UNet step of sample generation in bf16.
    """
    from core.base.families import get_family

    native = get_family(arch.family).native_resolution
    sizes = (native // 2, native)
    rows: dict = {"source": arch.source}
    text_choices = (False, True) if get_family(arch.family).trainable_text else (False,)  # no text LoRA: no row
    for precision in ("bf16", "no"):
        for checkpointing in (False, True):
            for text in text_choices:
                shapes = [StepShape(resolution=r, precision=precision, checkpointing=checkpointing,
                                    train_text_encoder=text) for r in sizes]
                (t1, m1), (t2, m2) = [(s.latent_tokens, measure_step(arch, s).step) for s in shapes]
                per_token = (m2 - m1) / (t2 - t1)
                rows[coefficient_key(shapes[0])] = [m1 - per_token * t1, per_token]
                progress(f"{arch.family} {coefficient_key(shapes[0])}: {m1 / GiB:.3f} / {m2 / GiB:.3f} GiB")
    tokens = (native // 8) ** 2
    rows["vae_encode"] = measure_vae(arch, native, decode=False) / tokens
    rows["vae_decode"] = measure_vae(arch, native, decode=True) / tokens
    rows["denoise"] = measure_denoise(arch, native) / tokens
    return rows
