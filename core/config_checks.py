"""The config's rules across fields and its paths, checked by ``core.config.validate`` (the schema, its
ranges and types live with the dataclasses in ``core.config``), and the error they raise."""

from __future__ import annotations

import re
from pathlib import Path


class ConfigError(ValueError):
    """A config value is wrong; the message says which key and what to do."""


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# The run's longest file name is ".NAME-step000000.XXXXXXXX.tmp.safetensors" (a save in progress):
# 40 bytes around the name, within the 255 bytes file systems allow.
MAX_NAME_BYTES = 128
_BAD_NAME_CHARS = set('<>:"/\\|?*') | {chr(c) for c in range(32)}


def check_rules(config) -> None:
    """Rules across fields of a ``core.config.TrainConfig``."""
    name = config.output.name
    if not name.strip() or name != name.strip() or name in {".", ".."} or set(name) & _BAD_NAME_CHARS:
        raise ConfigError(f"output.name = {name!r} cannot be used as a file name; use letters, digits, "
                          f"spaces, '-', '_' or '.' (no / \\ : * ? \" < > |)")
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise ConfigError(f"output.name is {len(name)} characters ({len(name.encode('utf-8'))} bytes) long; use at "
                          f"most {MAX_NAME_BYTES} bytes (about {MAX_NAME_BYTES} letters): file names such as "
                          f"NAME-step000500.safetensors must fit the file system's 255-byte limit")
    from core.data.dataset import is_caption_extension

    if not is_caption_extension(config.dataset.caption_extension):
        raise ConfigError(f"dataset.caption_extension = {config.dataset.caption_extension!r} must start with a "
                          f"dot followed by 1-15 letters or digits, e.g. '.txt' or '.caption'")
    t = config.train
    if t.learning_rate <= 0 and not (t.optimizer == "adafactor" and t.adafactor_relative_step):
        raise ConfigError("train.learning_rate = 0 trains nothing: the LoRA would never change; set it above 0 "
                          "(1e-4 is usual for LoRA, 1.0 for prodigy)")
    if t.min_timestep >= t.max_timestep:
        raise ConfigError(f"train.min_timestep = {t.min_timestep} must be below train.max_timestep = "
                          f"{t.max_timestep}")
    if t.optimizer == "prodigy" and t.loraplus_lr_ratio:
        raise ConfigError(f"train.loraplus_lr_ratio = {t.loraplus_lr_ratio:g} needs another optimizer: Prodigy "
                          f"estimates one step size for every weight (set it to 0, or choose adamw8bit)")
    te_lr = config.lora.text_encoder_learning_rate
    if t.optimizer == "prodigy" and config.lora.train_text_encoder and te_lr and te_lr != t.learning_rate:
        raise ConfigError(f"lora.text_encoder_learning_rate = {te_lr:g} differs from train.learning_rate = "
                          f"{t.learning_rate:g}, which Prodigy cannot do (one step size for every weight); set "
                          f"it to 0 to use the same")
    _check_adapter(config)
    if t.ema and t.optimizer == "schedulefree_adamw":
        raise ConfigError("train.ema = true with train.optimizer = 'schedulefree_adamw': schedule-free AdamW "
                          "already averages its weights (and saves the average); set train.ema to false")
    if config.lora.train_text_encoder and not config.lora.text_encoder_target_modules:
        raise ConfigError("lora.text_encoder_target_modules is empty while lora.train_text_encoder = true")
    if config.model.group_offload and (config.model.quantize != "none" or not config.train.gradient_checkpointing):
        raise ConfigError("model.group_offload = true needs model.quantize = 'none' (quantised layers cannot be "
                          "moved one by one) and train.gradient_checkpointing = true (without it every layer's "
                          "weights stay on the GPU until the backward pass)")
    d = config.dataset
    changing = [name for name, on in (("dataset.random_crop", d.random_crop), ("dataset.color_jitter", d.color_jitter),
                                      ("dataset.hue_jitter", d.hue_jitter)) if on]
    if changing and d.cache_latents:
        raise ConfigError(f"{' and '.join(changing)} change(s) every draw of a picture, and a cached latent is one "
                          f"fixed picture: set dataset.cache_latents = false (each picture then goes through the "
                          f"VAE every step: slower, as sd-scripts does), or turn {' and '.join(changing)} off")
    if d.no_upscale and not d.buckets:
        raise ConfigError("dataset.no_upscale = true needs dataset.buckets = true (without buckets every image "
                          "is cropped to the resolution square, which enlarges small ones)")
    if d.bucket_min_side and d.bucket_max_side and d.bucket_min_side > d.bucket_max_side:
        raise ConfigError(f"dataset.bucket_min_side = {d.bucket_min_side} is above dataset.bucket_max_side = "
                          f"{d.bucket_max_side}; lower the first or raise the second")
    if d.buckets and d.bucket_max_side and d.bucket_max_side < d.bucket_step:
        raise ConfigError(f"dataset.bucket_max_side = {d.bucket_max_side} is below dataset.bucket_step = "
                          f"{d.bucket_step}")
    for i, prompt in enumerate(config.sample.prompts):
        if not prompt.strip():
            raise ConfigError(f"sample.prompts[{i}] is empty; remove it or write a prompt")


def _check_adapter(config) -> None:
    lora = config.lora
    if lora.type == "locon" and not lora.conv_rank:
        raise ConfigError("lora.type = 'locon' trains the convolution layers at lora.conv_rank, which is 0; set it "
                          "(4-16 is typical), or choose lora.type = 'lora'")
    if lora.type == "lora" and lora.conv_rank:
        raise ConfigError(f"lora.conv_rank = {lora.conv_rank} while lora.type = 'lora', which trains no convolution "
                          f"layers; choose lora.type = 'locon' (or set lora.conv_rank to 0)")
    if lora.type in ("loha", "lokr"):
        if lora.dropout:
            raise ConfigError(f"lora.dropout = {lora.dropout:g} applies to lora and locon only ({lora.type} has no "
                              f"dropout on its input); set it to 0")
        if config.train.loraplus_lr_ratio:
            raise ConfigError(f"train.loraplus_lr_ratio = {config.train.loraplus_lr_ratio:g} is for lora and locon "
                              f"(it speeds up their up matrices, which {lora.type} does not have); set it to 0")
        if config.output.save_diffusers_format:
            raise ConfigError(f"output.save_diffusers_format = true cannot hold a {lora.type} (diffusers' LoRA "
                              f"format knows only LoRA); set it to false: the .safetensors file in the LyCORIS "
                              f"layout is what A1111, Forge and ComfyUI read")
    if lora.dora:
        if lora.type in ("loha", "lokr"):
            raise ConfigError(f"lora.dora = true with lora.type = {lora.type!r}: DoRA is trained on lora and locon "
                              f"here; set lora.dora to false or choose lora.type = 'lora'")
        if config.model.group_offload:
            raise ConfigError("lora.dora = true needs each layer's whole weight at every step, which "
                              "model.group_offload keeps in system RAM; turn one of them off")
        if config.output.save_diffusers_format:
            raise ConfigError("output.save_diffusers_format = true cannot hold DoRA's input-axis scales (diffusers' "
                              "format has peft's output-axis DoRA only); set it to false")
    if lora.type == "lokr" and lora.lokr_factor in (0, 1):
        raise ConfigError(f"lora.lokr_factor = {lora.lokr_factor} splits nothing; use -1 (automatic) or 2 and up")


def check_paths(config) -> None:
    """The model, dataset and output paths of a ``core.config.TrainConfig`` exist and are usable."""
    if not config.model.path:
        raise ConfigError("model.path is empty; set it to a diffusers model folder or a hub id")
    model = Path(config.model.path).expanduser()
    if model.exists():
        if model.is_file():
            if model.suffix.lower() not in (".safetensors", ".ckpt"):
                raise ConfigError(f"model.path = {config.model.path!r} is a file but not a checkpoint; use a "
                                  f".safetensors/.ckpt checkpoint, a diffusers folder or a hub id")
        elif not (model / "model_index.json").is_file() and not (model / "unet" / "config.json").is_file():
            raise ConfigError(f"model.path = {config.model.path!r} is not a diffusers model folder (no "
                              f"model_index.json or unet/config.json inside)")
    elif not _HUB_ID.match(config.model.path):
        raise ConfigError(f"model.path = {config.model.path!r}: no such folder, and it is not a hub id of the "
                          f"form 'owner/name'")
    out = Path(config.output.dir).expanduser()
    for parent in (out, *out.parents):
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"output.dir = {config.output.dir!r}: {parent} is a file, not a folder; point "
                                  f"output.dir at a folder (it is created if missing)")
            break
    if not config.dataset.path:
        raise ConfigError("dataset.path is empty; set it to the folder of your training images")
    dataset = Path(config.dataset.path).expanduser()
    if not dataset.is_dir():
        what = "is a file, not a folder" if dataset.exists() else "does not exist"
        raise ConfigError(f"dataset.path = {config.dataset.path!r} {what}; point it at the folder of your "
                          f"training images")
    if config.dataset.validation_path and not Path(config.dataset.validation_path).expanduser().is_dir():
        raise ConfigError(f"dataset.validation_path = {config.dataset.validation_path!r} is not a folder; "
                          f"point it at a folder of held-out images or leave it empty to use "
                          f"dataset.validation_split")


# ---------------------------------------------------------------- writing


def preflight(config) -> None:
    """What the app checks before it starts a run's process, beyond the config's own rules: a dataset with
    pictures left to train, and a model folder with every part. (The engine checks them again; this is so
    the form says so at once, naming the setting.)"""
    from core.data.dataset import picture_files
    from core.data.manifest import load_manifest

    folder = Path(config.dataset.path).expanduser()
    if folder.is_dir():
        pictures = picture_files(folder, config.dataset.caption_extension)
        manifest = load_manifest(folder)
        left = [p for p in pictures if not manifest.is_excluded(p.relative_to(folder).as_posix())]
        if not left:
            excluded = len(pictures) - len(left)
            why = (f"all {excluded} of its pictures are excluded in the health report" if excluded
                   else "it has no pictures")
            raise ConfigError(f"dataset.path: {folder.name} has nothing to train: {why}; add pictures or keep some")
    model = Path(config.model.path).expanduser()
    if (model / "model_index.json").is_file():
        from core.base.families import FamilyError, detect_family

        try:
            family = detect_family(model)
        except FamilyError as exc:
            raise ConfigError(f"model.path: {exc}") from None
        missing = family.missing_parts(model)
        if missing:
            raise ConfigError(f"model.path: {model.name} is missing its {', '.join(missing)} (an incomplete "
                              f"download?); download the whole model again or pick another")
