"""How much GPU memory a run needs, whether it fits a card, and which settings make it fit.

The estimate is quick (for the Train tab, live): weights, LoRA and optimizer
state are counted exactly from the architecture built on the meta device;
what one training step allocates on top (activations and gradients) and the
VAE's transients come from coefficients fitted to fake-tensor measurements of
the same architecture (``core.training.memory``), kept in
``memory_table.json`` beside this file (``benchmarks/bench_memory.py --write``
measures them again). Tests hold the estimate within 15 % of a fresh
measurement.

A run has three phases with different things on the card, and the plan's
peak is the largest:

* caching: the text encoders encode every caption, then leave the card and the VAE (fp32) encodes every
  picture (or, with ``dataset.cache_while_training``, the VAE stays beside the training UNet until the
  first epoch has drawn every picture: a phase of its own);
* training: the UNet (frozen, in the compute dtype or quantised), its LoRA,
  gradients and optimizer state, the step's activations, plus the text
  encoders when they are trained or their outputs not cached, and the VAE
  when latents are not cached;
* samples: the training phase's weights and optimizer state plus the VAE,
  with the text encoders only while a prompt is encoded (and one guided UNet
  step without gradients runs), then one fp32 decode of a sample image.

What fake tensors cannot see is added as a stated margin: the CUDA context
(``CUDA_CONTEXT``) and the allocator's fragmentation and library workspaces
(``WORKSPACE`` of the allocated peak).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

from core.training.memory import GiB, StepShape, coefficient_key

TABLE = Path(__file__).with_name("memory_table.json")
CUDA_CONTEXT = 0.5 * GiB  # CUDA runtime, cuBLAS/cuDNN handles: reserved by the driver, never "allocated"
WORKSPACE = 0.10  # fragmentation and kernel workspaces, as a share of the allocated peak
FIT_SHARE = 0.95  # a fitted plan leaves 5 % of the card to the desktop and other programs
CARDS_GB = (6, 8, 12, 16, 24)
# Bytes per weight of a quantised Linear layer (bitsandbytes): NF4 packs two weights a byte plus an
# 8-bit scale per block of 64 (double quantisation); int8 (LLM.int8) one byte plus an fp32 scale per row.
NF4_BYTES = 0.5 + 1 / 64
INT8_BYTES = 1.0
# The settings ``estimate`` reads (the Train tab's memory line follows them live).
ESTIMATE_KEYS = ("model.path", "model.family", "model.quantize", "model.group_offload", "dataset.resolution",
                 "dataset.cache_latents", "dataset.cache_while_training", "dataset.random_flip",
                 "dataset.shuffle_captions", "dataset.tag_dropout", "lora.rank", "lora.target_modules", "lora.type",
                 "lora.conv_rank", "lora.lokr_factor",
                 "lora.train_text_encoder",
                 "lora.text_encoder_target_modules", "train.batch_size", "train.mixed_precision",
                 "train.gradient_checkpointing", "train.optimizer", "sample.prompts", "sample.width", "sample.height")


@dataclass
class Plan:
    """An estimate for one configuration; sizes in bytes."""

    family: str
    source: str  # the architecture's source (reference model or model folder)
    phases: dict[str, dict[str, int]]  # phase -> part -> bytes allocated
    peak_phase: str
    vram: int | None  # the card's memory, if known
    card: str  # its name, or how vram was given
    settings: dict[str, object] = field(default_factory=dict)  # --set values that --fit chose
    notes: list[str] = field(default_factory=list)

    @property
    def allocated(self) -> int:
        return sum(self.phases[self.peak_phase].values())

    @property
    def parts(self) -> dict[str, int]:
        parts = dict(self.phases[self.peak_phase])
        parts["workspace"] = int(self.allocated * WORKSPACE)
        parts["cuda_context"] = int(CUDA_CONTEXT)
        return parts

    @property
    def peak(self) -> int:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool | None:
        return None if self.vram is None else self.peak <= self.vram * FIT_SHARE

    def to_json(self) -> dict:
        gib = lambda n: round(n / GiB, 3)  # noqa: E731
        return {"family": self.family, "architecture": self.source, "peak_gib": gib(self.peak),
                "allocated_gib": gib(self.allocated), "peak_phase": self.peak_phase,
                "parts": {k: gib(v) for k, v in self.parts.items()},
                "phases": {p: gib(sum(v.values())) for p, v in self.phases.items()},
                "fits": self.fits, "vram_gib": gib(self.vram) if self.vram else None, "card": self.card,
                "settings": self.settings, "notes": self.notes}


# ------------------------------------------------------------ exact counts


@dataclass(frozen=True)
class Inventory:
    """Parameter bytes of an architecture, by part, with the LoRA of a rank and targets."""

    unet: int  # frozen UNet weights, fp32 bytes
    unet_linear: int  # of which in Linear layers (what bitsandbytes quantises), fp32 bytes
    largest_linear: int  # parameters of the biggest Linear (dequantised one at a time)
    text: int  # frozen text encoder weights, fp32 bytes
    vae: int  # fp32 bytes
    lora_unet: int  # LoRA parameters (count)
    lora_text: int
    fp8: int  # UNet weights that fp8 storage keeps in one byte (count)
    largest_fp8: int  # parameters of the biggest such layer (cast up one at a time)
    offload_resident: int  # UNet weights on the card at once with group offloading, fp32 bytes
    text_linear: int = 0  # quantisable linear weights of the frozen-only encoders (T5), fp32 bytes
    text_fp8: int = 0  # weights fp8 storage keeps in one byte in them (count)


@functools.lru_cache(maxsize=32)
def inventory(arch, rank: int, targets: tuple[str, ...], text_targets: tuple[str, ...], adapter: str = "lora",
              conv_rank: int = 0, lokr_factor: int = -1) -> Inventory:
    from core.base.architecture import build_meta
    from core.base.families import get_family
    from core.base.offload import resident_weights
    from core.base.quantize import fp8_castable, quantizable
    from core.training.memory import add_lora_meta

    kind = get_family(arch.family)
    unet, encoders, vae = build_meta(arch)
    linears = [m for name, m in unet.named_modules() if quantizable(name, m)]
    frozen = lambda m: sum(p.numel() * 4 for p in (*m.parameters(), *m.buffers()))  # noqa: E731
    unet_bytes, text_bytes = frozen(unet), sum(frozen(e) for e in encoders)
    largest = max((m.weight.numel() for m in linears), default=0)
    linear_bytes = sum(m.weight.numel() * 4 for m in linears)
    fp8 = [m.weight.numel() for name, m in unet.named_modules() if fp8_castable(name, m)]
    resident = resident_weights(unet) * 4  # before the LoRA is added (offloading is applied before it)
    lora_unet = sum(p.numel() for p in add_lora_meta(unet, kind.lora_targets(unet, list(targets)), rank, adapter,
                                                     conv_rank, lokr_factor))
    trainable = [e for i, e in enumerate(encoders) if i in kind.trainable_text]  # the CLIP ones, never T5
    frozen_only = [e for i, e in enumerate(encoders) if i not in kind.trainable_text]  # T5: stored like the base
    text_linear = sum(m.weight.numel() * 4 for e in frozen_only for n, m in e.named_modules() if quantizable(n, m))
    text_fp8 = sum(m.weight.numel() for e in frozen_only for n, m in e.named_modules() if fp8_castable(n, m))
    lora_text = sum(p.numel() for e in trainable for p in add_lora_meta(e, text_targets, rank, adapter))
    return Inventory(unet_bytes, linear_bytes, largest, text_bytes, frozen(vae), lora_unet, lora_text, sum(fp8),
                     max(fp8, default=0), resident, text_linear, text_fp8)


def optimizer_bytes(params: int, optimizer: str, rank: int = 16) -> int:
    """The optimizer's state (core.training.optimizers.state_bytes): AdamW keeps two fp32 moments,
    bitsandbytes' 8-bit AdamW two uint8 moments and a fp32 scale per 256, Prodigy four fp32 tensors..."""
    from core.training.optimizers import state_bytes

    return state_bytes(params, optimizer, rank)


# ------------------------------------------------------------ fitted parts


@functools.lru_cache(maxsize=1)
def table() -> dict:
    """memory_table.json, read once per process (``table.cache_clear()`` after writing it)."""
    try:
        return json.loads(TABLE.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}


def fit_rows(arch) -> tuple[dict, str | None]:
    """The fitted coefficients for ``arch`` and a note when they come from the family's reference instead."""
    rows = table().get(arch.key)
    if rows is not None:
        return rows, None
    from core.base.architecture import reference

    ref = reference(arch.family)
    rows = table().get(ref.key)
    if rows is None:
        raise RuntimeError(f"{TABLE} has no measurements for {ref.source}; run "
                           f"python benchmarks/bench_memory.py --write")
    return rows, (f"activations from the {ref.source} measurements: {arch.source} has other layer shapes "
                  f"(python benchmarks/bench_memory.py --write --model PATH measures it)")


def step_bytes(rows: dict, shape: StepShape) -> int:
    """Activations and gradients of one step: batch x (c + a*T) with T latent tokens per picture."""
    c, a = rows[coefficient_key(shape)]
    return int(shape.batch * (c + a * shape.latent_tokens))


def vae_bytes(rows: dict, resolution: int, decode: bool) -> int:
    return int(rows["vae_decode" if decode else "vae_encode"] * (resolution // 8) ** 2)


# ------------------------------------------------------------ the estimate


def shape_of(config) -> StepShape:
    t, lora = config.train, config.lora
    return StepShape(config.dataset.resolution, t.batch_size, t.mixed_precision, t.gradient_checkpointing,
                     lora.rank, tuple(lora.target_modules), lora.train_text_encoder,
                     tuple(lora.text_encoder_target_modules), lora.type, lora.conv_rank, lora.lokr_factor)


def estimate(config, arch, vram: int | None = None, card: str = "") -> Plan:
    """The plan of ``config`` (a TrainConfig) on ``arch``; ``vram`` in bytes, if a card is known."""
    shape = shape_of(config)
    rows, note = fit_rows(arch)
    inv = inventory(arch, shape.rank, shape.targets, shape.text_targets, shape.adapter, shape.conv_rank,
                    shape.lokr_factor)
    width = 4 if shape.precision == "no" else 2
    quantize = config.model.quantize
    unet = (inv.offload_resident * width // 4 if config.model.group_offload
            else _unet_weights(inv, width, quantize))
    text = _text_weights(inv, width, quantize)
    lora_params = inv.lora_unet + (inv.lora_text if shape.train_text_encoder else 0)
    trained = {"lora": lora_params * 4,
               "optimizer": optimizer_bytes(lora_params, config.train.optimizer, shape.rank)}
    from core.training.train_data import pictures_per_encode, placement, text_is_cached

    where = placement(config)
    text_on_card, latents_cached = where["text"] == "device", where["vae"] == "cpu"
    while_training = latents_cached and config.dataset.cache_while_training
    step = step_bytes(rows, shape)
    dequantised = {"none": 0, "fp8": inv.largest_fp8 * width}.get(quantize, inv.largest_linear * width)
    encode = vae_bytes(rows, shape.resolution, decode=False)  # one picture
    per_call = pictures_per_encode((shape.resolution, shape.resolution))
    training = {"unet_weights": unet, **trained, "text_encoder_weights": text if text_on_card else 0,
                "vae_weights": 0 if latents_cached else inv.vae,
                "activations": step + dequantised + (0 if latents_cached else encode * shape.batch)}
    phases = {"training": training}
    first = latents_cached and not while_training  # all latents encoded before the first step
    if first or text_is_cached(config):  # the text encoders first, then the VAE: one at a time
        text_part = {"text_encoder_weights": text, "vae_weights": 0, "activations": 0}
        vae_part = {"text_encoder_weights": text if text_on_card else 0, "vae_weights": inv.vae,
                    "activations": encode * per_call}
        phases["caching"] = max(text_part, vae_part, key=lambda p: sum(p.values())) if first else text_part
    if while_training:  # the VAE stays on the card until the first epoch has encoded every picture
        pictures = min(per_call, 2 if config.dataset.random_flip else 1)
        phases["training_and_caching"] = {**training, "vae_weights": inv.vae,
                                 "activations": max(training["activations"], encode * pictures)}
    if config.sample.prompts:
        from core.base.families import get_family

        cached_prompts = get_family(arch.family).flow and text_is_cached(config)  # no text encoder for samples
        phases["samples"] = _samples_phase(config, rows, inv, training, 0 if cached_prompts else text, dequantised,
                                           width)
    peak_phase = max(phases, key=lambda p: sum(phases[p].values()))
    return Plan(arch.family, arch.source, phases, peak_phase, vram, card, notes=[note] if note else [])


def _samples_phase(config, rows: dict, inv: Inventory, training: dict, text: int, dequantised: int,
                   width: int) -> dict[str, int]:
    """Sample images during training: the VAE comes to the card, the text encoders only while the prompt
    is encoded and the first step runs (then they leave before the fp32 decode). The larger moment counts."""
    side = max(config.sample.width, config.sample.height) or config.dataset.resolution
    tokens = (side // 8) ** 2
    resident = {**training, "vae_weights": inv.vae}
    encoding = {**resident, "text_encoder_weights": text,
                "activations": int(rows["denoise"] * tokens * width / 2) + dequantised}
    decoding = {**resident, "activations": vae_bytes(rows, side, decode=True)}
    return max(encoding, decoding, key=lambda phase: sum(phase.values()))


def _text_weights(inv: Inventory, width: int, quantize: str) -> int:
    """The text encoders in the compute dtype; a flow family's T5 stored as the base is (core.training.train
    quantize_frozen_text)."""
    if quantize == "none" or not (inv.text_linear or inv.text_fp8):
        return inv.text * width // 4
    if quantize == "fp8":
        return (inv.text // 4 - inv.text_fp8) * width + inv.text_fp8
    per_weight = NF4_BYTES if quantize == "nf4" else INT8_BYTES
    return int((inv.text - inv.text_linear) * width // 4 + inv.text_linear // 4 * per_weight)


def _unet_weights(inv: Inventory, width: int, quantize: str) -> int:
    if quantize == "none":
        return inv.unet * width // 4
    if quantize == "fp8":
        return (inv.unet // 4 - inv.fp8) * width + inv.fp8
    per_weight = NF4_BYTES if quantize == "nf4" else INT8_BYTES
    linear = inv.unet_linear // 4
    return int((inv.unet - inv.unet_linear) * width // 4 + linear * per_weight)


# ------------------------------------------------------------ choosing settings


def fit(config, arch, vram: int, card: str = "", bf16: bool = True) -> Plan:
    """The fastest settings predicted to fit ``vram``: start from the quickest (latents cached, bf16 compute
    (fp16 on cards without bf16), no checkpointing, full-precision base) and give up speed in a fixed order
    until the plan fits.

    The order: cache latents before training (not while the first epoch runs), cache text (stop training
    the text encoder), gradient checkpointing, 8-bit AdamW, an int8 base, an NF4 base, then halve the batch
    (doubling gradient accumulation, so the effective batch stays), and last keep the frozen UNet in system
    RAM (group offloading, with the full-precision base: its layers come to the card one at a time; for the
    flow families, whose text encoder would then be full precision too, smaller pictures: 768, then 512). The
    plan's ``settings`` are the changed values as ``--set`` keys; ``fits`` is False when even the last step
    does not fit.
    """
    from core import config as config_mod

    steps = [
        {"dataset.cache_while_training": False},
        {"lora.train_text_encoder": False},
        {"train.gradient_checkpointing": True},
        {"train.optimizer": "adamw8bit"},
        {"model.quantize": "int8"},
        {"model.quantize": "nf4"},
    ]
    batch, accumulation = config.train.batch_size, config.train.gradient_accumulation_steps
    while batch > 1:
        batch, accumulation = batch // 2, accumulation * 2
        steps.append({"train.batch_size": batch, "train.gradient_accumulation_steps": accumulation})
    from core.base.families import get_family

    if get_family(arch.family).flow:
        # Group offloading would need the full-precision base, and its T5 / Qwen3 encoder (4-5 billion weights)
        # would then cache the captions in bf16: smaller pictures instead, as the peers train these on small cards.
        steps += [{"dataset.resolution": side} for side in (768, 512) if side < config.dataset.resolution]
    else:
        steps.append({"model.quantize": "none", "model.group_offload": True})  # the frozen UNet stays in RAM
    chosen = {"dataset.cache_latents": True, "dataset.cache_while_training": True,
              "train.gradient_checkpointing": False, "model.quantize": "none", "model.group_offload": False}
    if config.train.mixed_precision == "no":  # fp32 is the slowest on any GPU this plans for
        chosen["train.mixed_precision"] = "bf16" if bf16 else "fp16"
    plan = None
    for change in [{}, *steps]:
        chosen.update(change)
        candidate = config_mod.with_values(config, chosen)
        plan = estimate(candidate, arch, vram, card)
        if plan.fits:
            break
    plan.settings = {k: v for k, v in chosen.items() if _value(config, k) != v}
    if not plan.fits:
        plan.notes.append(f"even with every memory saving this run needs {plan.peak / GiB:.1f} GiB; lower "
                          f"dataset.resolution or lora.rank")
    return plan


def _value(config, key: str):
    section, name = key.split(".")
    return getattr(getattr(config, section), name)


@functools.lru_cache(maxsize=8)
def builtin_presets(arch, resolution: int = 0) -> dict[str, dict]:
    """Presets named "N GB GPU" for each card size: what ``fit`` chooses for ``arch`` at ``resolution``
    (0: the family's native size) from batch 1, rank 16, bf16."""
    from core import config as config_mod
    from core.base.families import get_family

    kind = get_family(arch.family)
    resolution = resolution or kind.native_resolution
    base = {"dataset.resolution": resolution, "train.mixed_precision": "bf16", "train.batch_size": 1,
            "lora.rank": 16, "lora.alpha": 16.0, "train.gradient_checkpointing": False, "model.quantize": "none",
            "train.optimizer": "adamw8bit", "train.learning_rate": kind.learning_rate,
            **kind.sampling(kind.variant(arch.denoiser))}
    start = config_mod.with_values(config_mod.TrainConfig(), base)
    presets = {}
    for gb in CARDS_GB:
        raw: dict[str, dict] = {}
        for key, value in {**base, **fit(start, arch, gb * GiB).settings}.items():
            section, name = key.split(".")
            raw.setdefault(section, {})[name] = value
        presets[f"{gb} GB GPU"] = raw
    return presets


def detect_card() -> tuple[int | None, str, bool]:
    """(memory in bytes, name, bf16 support) of the first CUDA GPU; (None, reason, True) without one."""
    import torch

    if not torch.cuda.is_available():
        return None, "no NVIDIA GPU found", True
    props = torch.cuda.get_device_properties(0)
    return props.total_memory, props.name, torch.cuda.is_bf16_supported()



LABELS = {"unet_weights": "UNet or transformer (frozen)", "text_encoder_weights": "text encoder weights",
          "vae_weights": "VAE weights (fp32)", "lora": "LoRA weights (fp32)", "optimizer": "optimizer state",
          "activations": "activations (step, encode or decode)", "workspace": f"workspace ({WORKSPACE:.0%} margin)",
          "cuda_context": "CUDA context"}


def format_plan(plan: Plan) -> str:
    lines = [f"{plan.family} ({plan.source})",
             f"Estimated peak GPU memory: {plan.peak / GiB:.2f} GiB, while {plan.peak_phase.replace('_', ' ')}"]
    lines += [f"  {LABELS.get(k, k):28} {v / GiB:7.2f} GiB" for k, v in plan.parts.items() if v]
    others = [f"{p} {(sum(v.values()) * (1 + WORKSPACE) + CUDA_CONTEXT) / GiB:.2f} GiB"
              for p, v in plan.phases.items() if p != plan.peak_phase]
    if others:
        lines.append("  other phases: " + ", ".join(others))
    if plan.vram is None:
        lines.append(f"Card: {plan.card}; pass --vram GB to check a card")
    else:
        verdict = "fits" if plan.fits else "does NOT fit"
        lines.append(f"{verdict} {plan.vram / GiB:.1f} GiB ({plan.card}; a plan fits within {FIT_SHARE:.0%})")
    if plan.settings:
        lines.append("Settings for this card:")
        lines += [f"  --set {k}={json.dumps(v) if isinstance(v, str) else str(v).lower()}"
                  for k, v in plan.settings.items()]
    lines += [f"Note: {n}" for n in plan.notes]
    return "\n".join(lines)
