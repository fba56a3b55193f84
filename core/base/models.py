"""Loading a base model's parts from a diffusers folder or a hub id.

Hub ids are first resolved to a local snapshot folder (downloaded once into
the Hugging Face cache), so everything after that works on local files and
cache keys can be derived from them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ModelError(RuntimeError):
    """The base model cannot be loaded; the message says which path and what to do."""


@dataclass
class BaseModel:
    path: Path  # local diffusers folder
    family: Any  # core.base.families.Family
    text: Any  # core.base.text.TextEncoders: the tokenizer(s) and text encoder(s)
    vae: Any
    denoiser: Any  # the network that trains: the UNet, or the transformer of a flow family
    noise_scheduler: Any  # DDPMScheduler with the model's training schedule (flow families: FlowMatchEuler...)
    prediction_type: str  # "epsilon", "v_prediction" or "flow" (velocity = noise - latents)
    block_plan: Any = None  # core.lora.blocks.BlockPlan when lora.blocks / block_ranks / block_lr_weights are set

    @property
    def variant(self) -> str:
        """Which model of the family this is (FLUX.1 "dev"/"schnell", SD 3.5 "large"/"3.5-medium"...)."""
        return self.family.variant(self.denoiser.config, self.path)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def tokenizer(self):
        """The first tokenizer (the one whose window caption lengths are measured against)."""
        return self.text.tokenizers[0]

    def fingerprint(self, component: str) -> str:
        """Cache-key identity of a component; "text" covers every text encoder of the family."""
        if component == "text":
            return "+".join(component_fingerprint(self.path, name) for name in self.family.text_encoders)
        return component_fingerprint(self.path, component)


def resolve_model_path(path: str, revision: str = "") -> Path:
    """A local diffusers folder: as given, converted once from a single-file checkpoint, or the local
    snapshot of a hub id (downloading it if needed)."""
    from core.base.checkpoints import CheckpointError, convert, is_single_file

    local = Path(path).expanduser()
    if local.is_dir():
        return local.resolve()
    if is_single_file(local):
        try:
            return convert(local)
        except CheckpointError as exc:
            raise ModelError(str(exc)) from None
    if local.exists():
        raise ModelError(f"{path} is a file but not a checkpoint (.safetensors or .ckpt); pass a diffusers folder, "
                         f"a single-file checkpoint or a hub id")
    from diffusers import DiffusionPipeline

    try:
        snapshot = DiffusionPipeline.download(path, revision=revision or None)
    except Exception as exc:  # hub errors come in many classes; all mean "could not fetch"
        raise ModelError(f"could not get model {path!r} from the Hugging Face hub ({type(exc).__name__}: "
                         f"{_first_line(exc)}). Check the id and your connection, or download the model into "
                         f"models/ and set model.path to that folder") from exc
    return Path(snapshot)


def load_models(path: str, revision: str = "", prediction_type: str = "auto", dtype=None,
                family: str = "auto") -> BaseModel:
    """Load tokenizer(s), text encoder(s), VAE, the denoiser and the training noise scheduler, all frozen.

    ``family`` ("auto" or a name of ``core.base.families.FAMILIES``) picks what
    to load; "auto" reads it from the model's files. ``dtype`` (e.g. bf16 under
    mixed precision) is applied to the denoiser and the text encoders while
    loading, so their fp32 copies never exist at once (about 1.7 GB less peak
    memory for SD 1.5). The VAE always loads in fp32: fp16 VAEs overflow.
    """
    import diffusers

    from core.base.families import FamilyError, detect_family, get_family
    from core.base.text import TextEncoders
    from core.quiet import quiet_local_loading

    folder = resolve_model_path(path, revision)
    try:
        kind = detect_family(folder) if family == "auto" else get_family(family)
    except FamilyError as exc:
        raise ModelError(str(exc)) from None
    missing = kind.missing_parts(folder)
    if missing:
        raise ModelError(f"model folder {folder} is not a complete {kind.label} diffusers model: it has no "
                         f"{', '.join(missing)}. Point model.path at a full folder (or hub id) of the model")
    quiet_local_loading()
    try:
        # The denoiser first: converting its file to the compute dtype briefly holds both copies (an SD 1.5
        # UNet: 3.4 GB of fp32 beside 1.7 GB of bf16), better before the other parts are in memory than after.
        denoiser = getattr(diffusers, kind.denoiser_class).from_pretrained(folder, subfolder=kind.denoiser,
                                                                           dtype=dtype)
        tokenizers = [_load_tokenizer(folder, name) for name in kind.tokenizers]
        encoders = [_load_text_encoder(folder, name, dtype) for name in kind.text_encoders]
        vae = getattr(diffusers, kind.vae_class).from_pretrained(folder, subfolder="vae")
        scheduler_class = diffusers.FlowMatchEulerDiscreteScheduler if kind.flow else diffusers.DDPMScheduler
        noise_scheduler = scheduler_class.from_pretrained(folder, subfolder="scheduler")
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"model folder {folder} could not be loaded as a {kind.label} diffusers model: "
                         f"{_first_line(exc)}") from exc
    resolved = _prediction_type(kind, noise_scheduler, prediction_type, folder)
    for module in (*encoders, vae, denoiser):
        module.requires_grad_(False)
        module.eval()
    text = TextEncoders(kind, tokenizers, encoders, kind.text_lengths(denoiser.config))
    return BaseModel(folder, kind, text, vae, denoiser, noise_scheduler, resolved)


def _prediction_type(kind, noise_scheduler, requested: str, folder: Path) -> str:
    if kind.flow:
        if requested not in ("auto", "flow"):
            raise ModelError(f"{kind.label} models are trained on the flow-matching target; model.prediction_type "
                             f"= {requested!r} does not apply to them (leave it 'auto')")
        return "flow"
    if requested != "auto":
        noise_scheduler.register_to_config(prediction_type=requested)
    resolved = noise_scheduler.config.prediction_type
    if resolved not in ("epsilon", "v_prediction"):
        raise ModelError(f"model {folder} predicts {resolved!r}; only 'epsilon' and 'v_prediction' can be "
                         f"trained (set model.prediction_type to override a wrong config)")
    return resolved


def _load_tokenizer(folder: Path, name: str):
    """The tokenizer class model_index.json names (CLIP's, or T5's for the flow families)."""
    import transformers

    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    declared = index.get(name, [None, "CLIPTokenizer"])[1] or "CLIPTokenizer"
    cls = getattr(transformers, declared, None) or transformers.AutoTokenizer
    return cls.from_pretrained(folder, subfolder=name)


def _load_text_encoder(folder: Path, name: str, dtype):
    """The class model_index.json names (Z-Image's Qwen3Model, not the causal LM its config mentions), else the
    one its own config names (CLIPTextModel, or CLIPTextModelWithProjection for SDXL's second)."""
    import transformers

    config = json.loads((folder / name / "config.json").read_text(encoding="utf-8"))
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    declared = index.get(name, [None, None])
    architecture = (declared[1] if isinstance(declared, list) and len(declared) == 2 and declared[1]
                    else (config.get("architectures") or ["CLIPTextModel"])[0])
    cls = getattr(transformers, architecture, None)
    if cls is None:
        raise ValueError(f"{name} is a {architecture}, which this transformers does not have")
    return cls.from_pretrained(folder, subfolder=name, dtype=dtype)


def component_fingerprint(folder: Path, component: str) -> str:
    """A short hash identifying one component's weights, for cache keys.

    Built from the component's config and the names, sizes and modification
    times of its weight files: cheap (no reading of gigabytes) and changes
    whenever the weights are replaced.
    """
    h = hashlib.sha256(component.encode())
    sub = Path(folder) / component
    for file in sorted(sub.glob("*")) if sub.is_dir() else []:
        if file.suffix == ".json":
            h.update(file.name.encode() + file.read_bytes())
        elif file.is_file():
            stat = file.stat()
            h.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    h.update(str(Path(folder).resolve()).encode())
    return h.hexdigest()[:16]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def native_resolution(model: str | Path) -> int | None:
    """The picture size a local diffusers model was made for (UNet sample size × VAE factor), from its configs."""
    folder = Path(model)
    if folder.is_file():  # a single-file checkpoint: its family's size (the file holds no config)
        from core.base.checkpoints import CheckpointError, checkpoint_family
        from core.base.families import get_family

        try:
            return get_family(checkpoint_family(folder)).native_resolution
        except CheckpointError:
            return None
    try:
        vae = json.loads((folder / "vae" / "config.json").read_text())
        if not (folder / "unet").is_dir():  # a transformer family: its VAE config says the picture size
            size = vae.get("sample_size")
            return size if isinstance(size, int) else None
        unet = json.loads((folder / "unet" / "config.json").read_text())
    except (OSError, ValueError):
        return None
    size = unet.get("sample_size")
    if isinstance(size, list):
        size = size[0]
    if not isinstance(size, int):
        return None
    return size * 2 ** (len(vae.get("block_out_channels", [0])) - 1)


def sample_defaults(model: str | Path) -> dict:
    """The picked model's recommended sample steps and guidance ({} for the SD families, or an unknown
    model): FLUX.1-schnell 4 steps without guidance, FLUX.1-dev 28 at 3.5, SD 3.5 28-40 at 4.5. Read from
    the model's configs, without loading it."""
    from core.base.families import FamilyError, detect_family

    folder = Path(model)
    if not (folder / "model_index.json").is_file():
        return {}
    try:
        kind = detect_family(folder)
        config = json.loads((folder / kind.denoiser / "config.json").read_text(encoding="utf-8"))
    except (FamilyError, OSError, ValueError):
        return {}
    return kind.sampling(kind.variant(config, folder))
