"""The run folder: refusing to mix runs, LoRA files, resume state (what a run leaves behind)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from core import config as config_mod
from core.config import ConfigError, TrainConfig

STOP_FILE = "STOP"


def lora_metadata(config: TrainConfig, step: int, data_info: dict, family: str = "sd1",
                  prediction_type: str = "epsilon") -> dict[str, str]:
    from core.lora_io import kohya_metadata

    return kohya_metadata(
        family=family,
        prediction_type=prediction_type,
        rank=config.lora.rank,
        alpha=config.lora.alpha,
        output_name=config.output.name,
        resolution=config.dataset.resolution,
        steps=step,
        learning_rate=config.train.learning_rate,
        base_model=config.model.path,
        train_text_encoder=config.lora.train_text_encoder,
        extra={
            "modelspec.trigger_phrase": config.output.trigger_phrase,
            "ss_seed": config.train.seed,
            **data_info,
            "ss_batch_size_per_device": config.train.batch_size,
            "ss_gradient_accumulation_steps": config.train.gradient_accumulation_steps,
            "ss_lr_scheduler": config.train.lr_scheduler,
            "ss_optimizer": config.train.optimizer,
            "ss_mixed_precision": config.train.mixed_precision,
            "ss_noise_offset": config.train.noise_offset,
            "ss_min_snr_gamma": config.train.min_snr_gamma,
            "ss_text_encoder_lr": config.lora.text_encoder_learning_rate or config.train.learning_rate,
            "ss_unet_lr": config.train.learning_rate,
        },
    )


def save_lora(config: TrainConfig, accelerator, unet, text_encoder, path: Path, step: int, data_info: dict,
              base=None) -> Path:
    """The kohya LoRA file of the run so far (``base``: the core.models.BaseModel, for its family)."""
    from core.lora_io import save_kohya_lora

    dtype = save_dtype(config)
    te = accelerator.unwrap_model(text_encoder) if config.lora.train_text_encoder else None
    family = base.family.name if base is not None else "sd1"
    prediction = base.prediction_type if base is not None else "epsilon"
    return save_kohya_lora(path, accelerator.unwrap_model(unet), te,
                           metadata=lora_metadata(config, step, data_info, family, prediction), dtype=dtype,
                           family=family)


def save_dtype(config: TrainConfig) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[config.output.save_precision]


def latest_state(run_dir: Path) -> Path | None:
    states = sorted((run_dir / "state").glob("step-*")) if (run_dir / "state").is_dir() else []
    return states[-1] if states else None


def save_state(config: TrainConfig, accelerator, step: int) -> Path:
    """Save accelerate's state (LoRA weights, optimizer, scheduler, RNG, progress); keep the newest few."""
    state_root = config.run_dir / "state"
    final = state_root / f"step-{step:08d}"
    tmp = state_root / f".tmp-step-{step:08d}"
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)  # a folder cannot be os.replace'd over; a crash leaves only the .tmp one
        for old in sorted(state_root.glob("step-*"))[:-config.output.keep_states]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def register_lora_state_hooks(accelerator, unet, text_encoder) -> None:
    """Make accelerate's save/load_state store only the LoRA weights, not whole gigabyte models."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    names = {id(accelerator.unwrap_model(unet)): "unet"}
    if text_encoder is not None:
        names[id(accelerator.unwrap_model(text_encoder))] = "text_encoder"

    def save_hook(models, weights, output_dir):
        for model in models:
            name = names[id(accelerator.unwrap_model(model))]
            if accelerator.is_main_process:
                tensors = {k: v.detach().cpu().contiguous()
                           for k, v in get_peft_model_state_dict(accelerator.unwrap_model(model)).items()}
                save_file(tensors, str(Path(output_dir) / f"lora_{name}.safetensors"))
            if weights:
                weights.pop()

    def load_hook(models, input_dir):
        while models:
            model = accelerator.unwrap_model(models.pop())
            tensors = load_file(str(Path(input_dir) / f"lora_{names[id(model)]}.safetensors"))
            set_peft_model_state_dict(model, tensors)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def check_run_dir(config: TrainConfig, resume: bool) -> None:
    """Refuse to mix a new run into an old one unless asked (read-only; safe on every process)."""
    run_dir = config.run_dir
    if resume:
        if not latest_state(run_dir):
            raise ConfigError(f"--resume: no saved state in {run_dir / 'state'}; the run never reached a "
                              f"checkpoint (output.save_every_n_steps) or output.save_state was false")
        _check_resumable(config, run_dir / "config.toml")
        return
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return
    if not ((run_dir / "events.jsonl").exists() or (run_dir / "config.toml").exists()):
        raise ConfigError(f"output folder {run_dir} already exists and was not made by this app; choose "
                          f"another output.name or output.dir")
    if not config.output.overwrite:
        raise ConfigError(f"output folder {run_dir} already holds a run named {config.output.name!r}; pass "
                          f"--resume to continue it, pick another output.name, or set output.overwrite = true "
                          f"to replace it")


# Settings that shape the saved weights and optimizer state: a resumed run must keep them.
_RESUME_FIXED = [("lora", "rank"), ("lora", "target_modules"), ("lora", "train_text_encoder"),
                 ("lora", "text_encoder_target_modules"), ("train", "optimizer"), ("model", "path")]


def _check_resumable(config: TrainConfig, saved_path: Path) -> None:
    if not saved_path.is_file():
        return
    saved = config_mod.load(saved_path, check_paths=False)
    for section, key in _RESUME_FIXED:
        old, new = getattr(getattr(saved, section), key), getattr(getattr(config, section), key)
        if old != new:
            raise ConfigError(f"--resume: {section}.{key} was {old!r} in this run and is {new!r} now; it cannot "
                              f"change in a resumed run (start a new run with another output.name)")


def prepare_run_dir(config: TrainConfig, resume: bool) -> Path:
    """Create (or, with output.overwrite, empty) the run folder; call on the main process only."""
    run_dir = config.run_dir
    if not resume and run_dir.exists() and any(run_dir.iterdir()):
        shutil.rmtree(run_dir)  # check_run_dir made sure it is one of our runs and overwrite is on
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / STOP_FILE).unlink(missing_ok=True)
    return run_dir
