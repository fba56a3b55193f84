"""Reading a LoRA file's summary (layout, rank, alpha, what it adapts, metadata) without loading its
weights: the safetensors header and the ``.alpha`` scalars only."""

from __future__ import annotations

import json
from pathlib import Path

from core.lora.lora_io import TE_READ_PREFIXES, UNET_PREFIX, LoraFileError

# ---------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------

# Suffixes of the "down" (A) matrix in the layouts we recognise.
_KOHYA_DOWN = ".lora_down.weight"
_DIFFUSERS_DOWN = (
    ".lora_A.weight",  # peft names, what diffusers writes today
    ".lora.down.weight",  # older diffusers attention-processor names
    "_lora.down.weight",
    ".lora_linear_layer.down.weight",
)


def _read_safetensors(path: Path) -> tuple[dict[str, str], dict[str, tuple[int, ...]], dict[str, float]]:
    """Metadata, every tensor's shape, and the value of every ``.alpha`` tensor.

    Only the header and the 0-d alpha tensors are read, so this is cheap on a
    large file. Any failure is reported as LoraFileError naming the file.
    """
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (not a dict)
            scalars = [k for k, shape in shapes.items() if k.endswith(".alpha") and not shape]
            alphas = {k: float(f.get_tensor(k).float()) for k in scalars}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        reason = f"{type(exc).__name__}: {exc}"
        raise LoraFileError(f"{path} is not a readable .safetensors LoRA file ({reason})") from exc
    return metadata, shapes, alphas


def _file_format(keys) -> str:
    if any(k.startswith((UNET_PREFIX, *TE_READ_PREFIXES)) and k.endswith(_KOHYA_DOWN) for k in keys):
        return "kohya"
    if any(k.endswith(_DIFFUSERS_DOWN) for k in keys):
        return "diffusers"
    return "unknown"


def _is_text_encoder_key(key: str, fmt: str) -> bool:
    if fmt == "kohya":
        return key.startswith(TE_READ_PREFIXES)
    return key.startswith("text_encoder") or "text_model" in key


def _diffusers_alphas(metadata: dict[str, str]) -> set[float] | None:
    """Alphas recorded in diffusers' ``lora_adapter_metadata`` (a JSON of LoraConfig dicts)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except json.JSONDecodeError:
        return None
    alphas = {float(v) for k, v in config.items() if k.endswith(".lora_alpha")}
    for k, v in config.items():
        if k.endswith(".alpha_pattern") and isinstance(v, dict):
            alphas.update(float(a) for a in v.values())
    return alphas or None


def _common_alpha(fmt, metadata, down_shapes: dict[str, tuple], alphas: dict[str, float]) -> float | None:
    """The one alpha all modules share, else None.

    A module with no stored alpha is loaded with alpha = rank (scale 1) by
    kohya, A1111 and diffusers alike, so that is what it counts as.
    """
    if fmt == "diffusers":
        recorded = _diffusers_alphas(metadata)
        if recorded is not None:
            return recorded.pop() if len(recorded) == 1 else None
    values = set()
    for key, shape in down_shapes.items():
        module = key[: -len(_KOHYA_DOWN)] if key.endswith(_KOHYA_DOWN) else None
        values.add(alphas.get(f"{module}.alpha", float(shape[0])) if module else float(shape[0]))
    return values.pop() if len(values) == 1 else None


def read_lora_info(path) -> dict:
    """Summarise a LoRA file without loading its weights.

    Returns ``metadata`` (the safetensors header metadata), ``modules``
    (number of LoRA modules), ``rank`` (largest rank), ``alpha`` (the common
    alpha, None when modules differ), ``text_encoder`` / ``unet`` (which
    models it adapts) and ``format`` ("kohya", "diffusers" or "unknown").
    Raises FileNotFoundError or LoraFileError, both naming the file.
    """
    path = Path(path)
    metadata, shapes, alphas = _read_safetensors(path)
    fmt = _file_format(shapes)
    down_suffixes = (_KOHYA_DOWN,) if fmt == "kohya" else _DIFFUSERS_DOWN
    down = {k: s for k, s in shapes.items() if k.endswith(down_suffixes)} if fmt != "unknown" else {}
    te = any(_is_text_encoder_key(k, fmt) for k in down)
    return {
        "metadata": metadata,
        "modules": len(down),
        "rank": max((s[0] for s in down.values()), default=0),
        "alpha": _common_alpha(fmt, metadata, down, alphas) if down else None,
        "text_encoder": te,
        "unet": any(not _is_text_encoder_key(k, fmt) for k in down),
        "format": fmt,
    }
