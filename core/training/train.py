"""LoRA training for Stable Diffusion 1.x, 2.x and SDXL, as a plain function the app and CLI share.

``run(config, emit, should_stop)`` reads top to bottom like the diffusers
LoRA example -- load, freeze, add adapter, optimizer, data, loop, save -- but
split into phases so a UI can stop it, tests can call it, and every result is
reported as an event (see ``core.events``).

The objective is ordinary diffusion training: noise the cached VAE latents
at a random timestep and regress the UNet's output onto the scheduler's
target (the noise for epsilon models, the velocity for v-prediction), with
optional min-SNR-gamma weighting and noise offset.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from core import config as config_mod
from core.config import ConfigError, TrainConfig
from core.data.dataset import ImageItem, load_split
from core.events import (
    Emit,
    Finished,
    Message,
    Phase,
    RunStarted,
)
from core.training.attach import add_lora  # noqa: F401 - part of this API (tests build runs from its steps)
from core.training.loop import Loop, RunResult, TrainingError, TrainState  # noqa: F401 - part of this API
from core.training.objective import Validator
from core.training.optimizers import build_lr_scheduler, build_optimizer, param_groups
from core.training.run_folder import (
    RunPaths,
    check_run_dir,
    latest_state,
    prepare_run_dir,
    register_lora_state_hooks,
    trainer_lock,
)
from core.training.train_data import (
    LatentEncoder,
    bucket_record,
    build_dataloader,
    build_entries,
    cache_texts,
    cached_text,
    placement,
    text_is_cached,
)


def build_accelerator(config: TrainConfig, emit: Emit):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed

    precision = config.train.mixed_precision
    if precision == "fp16" and not torch.cuda.is_available():
        emit(Message("warning", "train.mixed_precision = 'fp16' needs an NVIDIA GPU; training in fp32 "
                                "(use 'bf16' on CPUs)"))
        precision = "no"
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state and AcceleratorState().num_processes == 1:
        # A second run in the same process (tests, notebooks) may use another precision;
        # accelerate keeps one global state, so reset it (never under a multi-process launch).
        AcceleratorState._reset_state()
    # A multi-process launch on a machine without CUDA (tests, CPU clusters) is data-parallel over gloo,
    # which accelerate only sets up when asked for the CPU explicitly.
    distributed_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(
        cpu=distributed_cpu,
        mixed_precision=precision,
        gradient_accumulation_steps=config.train.gradient_accumulation_steps,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        project_dir=str(config.run_dir),
        **tracking(config),
    )
    set_seed(config.train.seed)
    return accelerator


def tracking(config: TrainConfig) -> dict:
    """accelerate's tracker arguments: TensorBoard in RUN/tensorboard when output.tensorboard is on."""
    if not config.output.tensorboard:
        return {}
    from core.training.tracking import tracker_arguments

    return tracker_arguments(config)


def load_dataset(config: TrainConfig, emit: Emit) -> tuple[list[ImageItem], list[ImageItem]]:
    emit(Phase("scanning dataset", 0, 0))
    d = config.dataset
    split = load_split(d.path, d.caption_extension, d.validation_split, config.train.seed, d.validation_path)
    for note in split.notes:
        emit(Message("info", note))
    for warning in split.warnings:
        emit(Message("warning", warning))
    return split.train, split.validation


def load_base(config: TrainConfig, accelerator, emit: Emit):
    """Load the frozen model parts and place them; frozen weights in the compute dtype."""
    from core.base.models import load_models

    emit(Phase("loading model", 0, 0))
    dtype = weight_dtype(accelerator)
    base = load_models(config.model.path, config.model.revision, config.model.prediction_type, dtype,
                       config.model.family)
    emit(Message("info", f"{base.family.label} model ({base.prediction_type}) from {base.path}"))
    if config.model.clip_skip > 1:
        if base.family.name in ("sd1", "sd2"):
            base.text.clip_skip = config.model.clip_skip
        else:
            emit(Message("warning", f"model.clip_skip = {config.model.clip_skip} applies to SD 1.x/2.x; "
                                    f"{base.family.label} keeps its own text layers"))
    if config.train.zero_terminal_snr:
        zero_terminal_snr(base)
    if config.dataset.max_token_length > 75:
        if base.family.flow:
            emit(Message("warning", f"dataset.max_token_length = {config.dataset.max_token_length} applies to SD "
                                    f"1.x/2.x/SDXL; {base.family.label} reads captions with its own text "
                                    f"encoders' windows"))
        else:
            base.text.chunks = config.dataset.max_token_length // 75
    if base.family.flow and config.sample.sampler != "default":
        raise ConfigError(f"sample.sampler = {config.sample.sampler!r} is a sampler of the SD families; "
                          f"{base.family.label} samples with its own flow-matching scheduler: set it to 'default'")
    # The UNet (loaded in the compute dtype) goes to the device once the caches are built.
    what = "UNet" if base.family.denoiser == "unet" else "transformer"
    if config.model.quantize == "fp8":
        from core.base.quantize import store_in_fp8

        count = store_in_fp8(base.denoiser, dtype)
        emit(Message("info", f"{what} base stored in fp8 ({count / 1e6:.0f}M weights, cast to {dtype} per layer; "
                             f"the LoRA trains in fp32 on top)"))
    elif config.model.quantize != "none":
        from core.base.quantize import quantize_linears

        count = quantize_linears(base.denoiser, config.model.quantize, dtype)
        emit(Message("info", f"{what} base quantised to {config.model.quantize} ({count} linear layers; the LoRA "
                             f"trains in fp32 on top)"))
    if config.model.quantize != "none":
        quantize_frozen_text(config, base, dtype, emit)
    if config.model.group_offload:
        from core.base.offload import offload_linears

        count = offload_linears(base.denoiser, accelerator.device)
        emit(Message("info", f"UNet base: the weights of its {count} linear layers stay in system RAM, each "
                             f"brought to the GPU while its layer runs (group offloading; slower steps)"))
    base.text.to(accelerator.device, dtype=dtype)
    base.vae.to(dtype=torch.float32)  # fp16 VAEs overflow; it comes to the card once the text is cached
    return base


def zero_terminal_snr(base) -> None:
    """Rescale the training schedule's betas so the last timestep has zero SNR (diffusers' own rescaling)."""
    if base.family.flow or base.prediction_type != "v_prediction":
        what = ("a flow-matching model, whose last step is pure noise already" if base.family.flow
                else f"an {base.prediction_type} model: at zero SNR the noise it predicts is the input itself")
        raise ConfigError(f"train.zero_terminal_snr = true needs a v-prediction SD 1.x/2.x/SDXL model; "
                          f"{base.path.name} is {what}. Set it to false (or model.prediction_type = "
                          f"'v_prediction' for a v-prediction model with a wrong config)")
    scheduler = base.noise_scheduler
    base.noise_scheduler = type(scheduler).from_config(scheduler.config, rescale_betas_zero_snr=True)


def quantize_frozen_text(config: TrainConfig, base, dtype, emit: Emit) -> None:
    """The flow families' T5 (4.7 B parameters, 9.5 GB in bf16) stored like the base: it only encodes the
    captions once, and in full precision it alone would not fit an 8 GB card (the peers ship it in fp8)."""
    from core.base.quantize import quantize_linears, store_in_fp8

    frozen = [e for i, e in enumerate(base.text.encoders) if i not in base.family.trainable_text]
    for encoder in frozen:
        if config.model.quantize == "fp8":
            count = store_in_fp8(encoder, dtype)
        else:
            count = quantize_linears(encoder, config.model.quantize, dtype)
        if count:
            emit(Message("info", f"{type(encoder).__name__} stored in {config.model.quantize} too ({count} "
                                 f"layers): it encodes every caption once, before training"))


def weight_dtype(accelerator) -> torch.dtype:
    from core.precision import torch_dtype

    return torch_dtype(accelerator.mixed_precision)


def run(config: TrainConfig, emit: Emit, should_stop: Callable[[], bool] = lambda: False,
        resume: bool = False, final_check: bool = False, keep_models: bool = False) -> RunResult:
    """Train a LoRA as ``config`` says (a config from ``core.config.load``/``from_dict``, which validate it).
    Raises ConfigError/DatasetError/ModelError on bad input.

    ``should_stop`` is polled after every optimizer step (as is a file named
    STOP in the run folder); when it says so, the LoRA and the resume state
    are saved and the function returns with status "stopped".

    ``final_check`` (what ``python -m core train`` does): once the final file is
    saved, the trained models are let go and the file gets verify-lora's full
    check (diffusers' loader reads it, it changes the image); a file that fails
    raises TrainingError (kind "check") after the run's "finished" event.

    The result holds the trained models (UNet and text encoders with their
    adapters) only with ``keep_models`` and without the final check: for
    callers in the same process that look at them (tests, notebooks).
    """
    config = config_mod.resolve_paths(config)  # validated where it entered the process (the CLI, the form)
    check_run_dir(config, resume)
    with trainer_lock(config.run_dir):
        accelerator = build_accelerator(config, emit)
        main_emit = emit if accelerator.is_main_process else (lambda event: None)
        if accelerator.is_main_process:
            prepare_run_dir(config, resume)
            config_mod.save(config, RunPaths.of(config).config)
        accelerator.wait_for_everyone()
        if config.output.tensorboard:  # into the run folder, once it is there
            from core.training.tracking import start_tensorboard

            start_tensorboard(config, accelerator, main_emit)
        result = _train(config, accelerator, main_emit, should_stop, resume)
        base, result.base = result.base, None
        if final_check or not keep_models:
            result.denoiser = result.text_encoder = None
            accelerator.free_memory()
        reuse = final_check and accelerator.is_main_process and reusable_for_check(config)
        if final_check and accelerator.is_main_process:
            main_emit(Phase("checking the LoRA file", 0, 0))
        check = (verify_final(config, main_emit, base if reuse else None, accelerator.device)
                 if final_check and accelerator.is_main_process else None)
        del base
        main_emit(Finished(result.status, result.step, str(result.lora_path),
                           peak_memory_mb=peak_memory_mb(accelerator.device)))
        if check is not None and not check.ok:
            reasons = [f"{len(check.unmatched)} module(s) do not map onto the base model"] * bool(check.unmatched)
            raise TrainingError(f"check: {check.file} failed verification: " + "; ".join(reasons + check.problems),
                                "check")
        return result


def peak_memory_mb(device: torch.device) -> float:
    """The process's peak so far, in MiB: GPU memory allocated on CUDA, else the peak resident RAM."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
    except ImportError:  # Windows: the peak working set
        import psutil

        return getattr(psutil.Process().memory_info(), "peak_wset", 0) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def reusable_for_check(config: TrainConfig) -> bool:
    """Whether the final check can use the model parts already in memory: their weights must be the base
    model's own (not quantised or fp8-stored) and carry no LoRA that cannot be taken off (the text encoders'
    is injected without diffusers' unloading)."""
    return config.model.quantize == "none" and not config.lora.train_text_encoder


def verify_final(config: TrainConfig, emit: Emit, base=None, device=None):
    """verify-lora on the run's final file, as others will load it: every module maps, diffusers' loader reads
    it, it changes the image at the sample seed. Emits the check (step -1) and returns it.

    With ``base`` (the run's loaded model, see ``reusable_for_check``) the training adapter is taken off and
    the same parts serve the check, instead of loading the model a second time (which held the file's fp32
    weights beside their converted copy: the run's peak memory)."""
    import gc

    from core.lora.verify import event, verify

    pipe = None
    if base is not None:
        from core.base.sample import pipeline_from_parts

        base.denoiser.unload_lora()  # peft's layers give way to the base layers they wrap
        base.denoiser.eval()
        for part in (base.vae, *base.text.encoders):
            part.to(device)
        if not config.model.group_offload:
            base.denoiser.to(device)
        pipe = pipeline_from_parts(base.path, base.vae, base.text, base.denoiser)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    release_freed_memory()
    prompt = config.sample.prompts[0] if config.sample.prompts else "a photo"
    # The effect is checked cheaply: a picture of half the training size at two steps, with and without the
    # LoRA (a LoRA that changes nothing changes nothing at any size; the sample images show the quality).
    size = max(64, config.dataset.resolution // 2 // 8 * 8)
    # A bf16 run is checked in bf16 (on a CPU the default would load the whole model again in fp32).
    dtype = torch.bfloat16 if config.train.mixed_precision == "bf16" else None
    result = verify(RunPaths.of(config).final_lora, config.model.path, config.model.revision, config.model.family,
                    prompt=prompt, seed=config.sample.seed, steps=2, size=size, dtype=dtype,
                    offload=config.model.group_offload, pipe=pipe)
    emit(event(result, -1))
    return result


def release_freed_memory() -> None:
    """Hand memory that freed tensors leave in the C allocator back to the system (glibc keeps it
    otherwise, and the final check's second model would be loaded on top of it)."""
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # another C library: nothing to do
            pass


def _train(config: TrainConfig, accelerator, emit: Emit, should_stop, resume: bool) -> RunResult:
    from core.training.cache import FeatureCache

    train_items, val_items = load_dataset(config, emit)
    from core.training.regularization import load_regularization

    class_items = load_regularization(config, train_items, emit)
    base = load_base(config, accelerator, emit)
    unet_params, te_params = add_lora(config, base)
    named = {id(p): n for m in (base.denoiser, base.text) for n, p in m.named_parameters()}
    from core.lora.blocks import weight_function

    optimizer = build_optimizer(config, param_groups(config, unet_params, te_params, named, weight_function(base)),
                                emit)
    cache = FeatureCache(config.dataset.cache_dir or Path(config.output.dir) / ".cache")
    encoder = (LatentEncoder(config, base, cache, accelerator.device, emit)
               if config.dataset.cache_latents and config.dataset.cache_while_training else None)
    # One frozen model on the card at a time while caching: the text encoders encode every caption and leave
    # (unless they train or captions change per draw), then the VAE encodes the pictures (or comes back
    # while the first epoch draws them). Off the card stays what only sampling needs again; the UNet comes on.
    where = placement(config)
    with accelerator.main_process_first():
        negative = config.sample.negative_prompt if base.family.negative_prompt else ""
        prompts = ([*config.sample.prompts, negative]
                   if base.family.flow and text_is_cached(config) else [])  # flow samples use cached prompts
        if text_is_cached(config):
            captions = [item.caption for item in [*train_items, *val_items, *class_items]]
            cache_texts(captions + ([""] if config.dataset.caption_dropout else []) + prompts, base, cache)
        sample_text = {prompt: cached_text(prompt, base, cache) for prompt in prompts}
        base.text.to(accelerator.device if where["text"] == "device" else "cpu")
        if encoder is None:
            base.vae.to(accelerator.device)
        train_entries = build_entries(config, train_items, base, cache, emit, "training",
                                      flips=config.dataset.random_flip, encoder=encoder)
        val_entries = build_entries(config, val_items, base, cache, emit, "validation", encoder=encoder)
        class_entries = build_entries(config, class_items, base, cache, emit, "class picture",
                                      flips=config.dataset.random_flip, encoder=encoder)
        for entry in class_entries:
            entry.weight = config.train.prior_loss_weight
        empty_text = (cached_text("", base, cache)
                      if text_is_cached(config) and config.dataset.caption_dropout else None)
    base.vae.to(accelerator.device if where["vae"] == "device" else "cpu")
    if encoder is not None:
        encoder.start()
        if encoder.pending:
            emit(Message("info", f"{len(encoder.pending)} latents are not cached yet: each is encoded the first "
                                 f"time a step draws its picture"))
    if config.model.group_offload:  # all but the offloaded linear weights, which come one layer at a time
        from core.base.offload import trainable_to

        trainable_to(base.denoiser, accelerator.device)
    else:
        base.denoiser.to(accelerator.device)
    buckets = bucket_record(config, train_items, [e.placement for e in train_entries])
    report_buckets(config, buckets, emit, accelerator.is_main_process)
    train_te = config.lora.train_text_encoder
    dataloader = build_dataloader(config, train_entries + class_entries, empty_text)
    place_unet = not config.model.group_offload  # accelerate would move an offloaded UNet to the card whole
    if train_te:
        unet, text_encoder, optimizer, dataloader = accelerator.prepare(
            base.denoiser, base.text, optimizer, dataloader, device_placement=[place_unet, True, True, True])
    else:
        unet, optimizer, dataloader = accelerator.prepare(base.denoiser, optimizer, dataloader,
                                                          device_placement=[place_unet, True, True])
        text_encoder = base.text
    steps_per_epoch = math.ceil(len(dataloader) / config.train.gradient_accumulation_steps)
    total = (config.train.max_train_epochs * steps_per_epoch if config.train.max_train_epochs
             else config.train.max_train_steps)
    lr_scheduler = accelerator.prepare(build_lr_scheduler(config, optimizer, total, accelerator.num_processes))
    register_lora_state_hooks(accelerator, unet, text_encoder if train_te else None)
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    ema = None
    if config.train.ema:
        from core.training.ema import LoraEma

        ema = LoraEma([p for group in optimizer.param_groups for p in group["params"]], config.train.ema_decay,
                      config.train.ema_update_every)
        accelerator.register_for_checkpointing(ema)
    generator = torch.Generator(device=accelerator.device).manual_seed(
        config.train.seed + accelerator.process_index)
    if resume:
        accelerator.load_state(str(latest_state(config.run_dir)))
        generator.set_state(state.noise_rng)
        emit(Message("info", f"resumed from step {state.step} ({latest_state(config.run_dir).name})"))
    loop = Loop(config=config, accelerator=accelerator, emit=emit, should_stop=should_stop, base=base, denoiser=unet,
                 text_encoder=text_encoder, optimizer=optimizer, lr_scheduler=lr_scheduler, dataloader=dataloader,
                 state=state, generator=generator, total=total,
                 data_info={**data_metadata(train_items, buckets), "ss_num_reg_images": len(class_items)},
                 validator=Validator(config, val_entries, base, accelerator.device), encoder=encoder,
                 sample_text=sample_text, ema=ema)
    emit(RunStarted(str(config.run_dir), total, state.step, len(train_items), len(val_items),
                    config.train.batch_size, accelerator.num_processes, str(accelerator.device), resume))
    return loop.run(resume)


def report_buckets(config: TrainConfig, record: dict, emit: Emit, main: bool) -> None:
    """Print the bucket table and keep it (with every image's placement) in the run folder."""
    from core.data.buckets import format_table
    from core.fsutil import write_json

    if not main:
        return
    write_json(RunPaths.of(config).buckets, record)
    if config.dataset.buckets:
        emit(Message("info", f"{len(record['buckets'])} bucket(s), mean aspect error "
                             f"{record['mean_aspect_error']:.3f}:\n{format_table(record['buckets'])}"))


def data_metadata(items: list[ImageItem], buckets: dict) -> dict:
    """kohya's data keys of the LoRA metadata: image count, buckets, tag frequency per folder."""
    from core.data.health import comma_tag_counts

    folders: dict[str, list[str]] = {}
    for item in items:
        folders.setdefault(item.path.parent.name, []).append(item.caption)
    return {
        "ss_num_train_images": sum(row["per_epoch"] for row in buckets["buckets"]),
        "ss_enable_bucket": buckets["enabled"],
        "ss_bucket_no_upscale": buckets["no_upscale"],
        "ss_bucket_info": {"buckets": {str(i): {"resolution": [row["width"], row["height"]],
                                                "count": row["per_epoch"]}
                                       for i, row in enumerate(buckets["buckets"])},
                           "mean_img_ar_error": buckets["mean_aspect_error"]},
        "ss_tag_frequency": {folder: _capped(comma_tag_counts(captions)) for folder, captions in folders.items()},
    }


# What the metadata keeps of a folder's tags: the most common ones, each cut to a readable length. Every
# intermediate LoRA file carries it, so a pathological caption must not grow each file by megabytes.
MAX_METADATA_TAGS = 1000
MAX_TAG_CHARS = 100


def _capped(frequency: list[tuple[str, int]]) -> dict[str, int]:
    tags: dict[str, int] = {}
    for tag, count in frequency[:MAX_METADATA_TAGS]:
        tags[tag[:MAX_TAG_CHARS]] = tags.get(tag[:MAX_TAG_CHARS], 0) + count
    return tags
