"""Generating images with a base model and, optionally, a LoRA.

Used for sample images during training, by ``python -m core sample`` and by
the app's Prompt tab (``core.lora.preview``, which also loads the LoRA files).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Sampler names users know (A1111 vocabulary) -> diffusers scheduler classes.
SAMPLERS = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
}


def make_scheduler(model_folder: str | Path, sampler: str = "default"):
    """The model's own inference scheduler, or the named sampler built from its config."""
    import diffusers

    folder = Path(model_folder)
    index = json.loads((folder / "model_index.json").read_text()) if (folder / "model_index.json").is_file() else {}
    own_class = index.get("scheduler", [None, "PNDMScheduler"])[1]
    name = own_class if sampler == "default" else SAMPLERS.get(sampler)
    if name is None:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of: default, {', '.join(SAMPLERS)}")
    if index.get("transformer") and sampler != "default":
        raise ValueError(f"sampler {sampler!r} is for the SD families; flow-matching models sample with their "
                         f"own scheduler (sample.sampler = 'default')")
    cls = getattr(diffusers, name)
    return cls.from_pretrained(folder, subfolder="scheduler")


def _pipeline_extras(family) -> dict:
    """Constructor arguments a family's pipeline needs beyond its models (no watermark, no safety checker)."""
    if family.flow:
        return {}
    if family.pooled:
        return {"add_watermarker": False}
    return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


def pipeline_from_parts(model_folder, vae, text, denoiser, sampler: str = "default", zero_snr: bool = False):
    """A pipeline sharing already-loaded modules (no copy), for samples during training.

    ``text`` is the model's ``core.base.text.TextEncoders``; its family picks the pipeline class.
    ``zero_snr``: the schedule rescaled to zero terminal SNR, sampled from its last (pure-noise) step.
    """
    import diffusers

    family = text.family
    cls = getattr(diffusers, family.pipeline_class)
    scheduler = make_scheduler(model_folder, sampler)
    if zero_snr:
        if isinstance(scheduler, diffusers.PNDMScheduler):  # it cannot rescale; DDIM is what the paper samples
            scheduler = diffusers.DDIMScheduler.from_config(scheduler.config)
        scheduler = type(scheduler).from_config(scheduler.config, rescale_betas_zero_snr=True,
                                                timestep_spacing="trailing")
    parts = {"vae": vae, family.denoiser: denoiser, "scheduler": scheduler}
    for name, tokenizer, encoder in zip(family.text_encoders, text.tokenizers, text.encoders, strict=True):
        parts[name] = encoder
        parts[name.replace("text_encoder", "tokenizer")] = tokenizer
    pipe = cls(**parts, **_pipeline_extras(family))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pipeline(model: str, revision: str = "", device: str | None = None, sampler: str = "default",
                  dtype: torch.dtype | None = None, offload: bool = False):
    """Load a base model for generation, on the GPU when there is one; with ``offload`` its weights stay in
    system RAM and each layer comes to the GPU while it runs (diffusers' group offloading, for a GPU the
    model does not fit)."""
    import diffusers

    from core.base.families import FamilyError, detect_family
    from core.base.models import ModelError, resolve_model_path
    from core.quiet import quiet_local_loading

    folder = resolve_model_path(model, revision)
    quiet_local_loading()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.float16 if device == "cuda" else torch.float32)
    try:
        family = detect_family(folder)
        cls = getattr(diffusers, family.pipeline_class)
        pipe = cls.from_pretrained(folder, dtype=dtype, **_pipeline_extras(family))
    except (OSError, ValueError, FamilyError) as exc:
        raise ModelError(f"model {model!r} could not be loaded for sampling: {exc}") from exc
    pipe.scheduler = make_scheduler(folder, sampler)
    pipe.set_progress_bar_config(disable=True)
    if offload and torch.device(device).type == "cuda":
        pipe.enable_group_offload(torch.device(device), offload_type="leaf_level", use_stream=True)
        return pipe
    return pipe.to(device)


@torch.no_grad()
def generate(pipe, prompt: str, *, seed: int, steps: int, guidance_scale: float = 7.5, width: int = 512,
             height: int = 512, negative_prompt: str = "", after_first_step=None, embeds: dict | None = None,
             clip_skip: int = 1, chunks: int = 0):
    """One image at a fixed seed (the seed alone decides the starting noise, on any device).

    ``after_first_step`` is called once the prompt is encoded and the first denoising step is done: the
    moment the text encoders are no longer needed (training moves them off the GPU there, before the
    VAE decodes).

    ``embeds`` (flow pipelines): the encoded prompt and negative prompt as the pipeline takes them
    (``Family.pipeline_embeds``), used instead of the text encoders. ``clip_skip`` as in model.clip_skip
    (A1111's count: 2 is the penultimate layer; diffusers counts one less). ``chunks``: CLIP windows of 75
    tokens per prompt for the SD families (dataset.max_token_length / 75); 0: as many as the longer of the
    prompt and the negative prompt needs, up to three, as A1111 reads long prompts.
    """
    generator = torch.Generator("cpu").manual_seed(seed)

    def on_step_end(pipeline, step, timestep, kwargs):
        if step == 0 and after_first_step is not None:
            after_first_step()
        return kwargs

    if embeds is None and _flow_family(pipe) is None:
        chunks = chunks or _windows_needed(pipe.tokenizer, [prompt, negative_prompt])
        if clip_skip > 1 or chunks > 1:  # diffusers' clip_skip expects transformers 4's CLIP; it cuts at 77
            embeds = _clip_embeds(pipe, prompt, negative_prompt, clip_skip, chunks)
    extra = prompt_arguments(pipe, prompt, negative_prompt) if embeds is None else embeds
    result = pipe(
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        width=width,
        height=height,
        generator=generator,
        callback_on_step_end=on_step_end,
        **extra,
    )
    return result.images[0]


def prompt_arguments(pipe, prompt: str, negative_prompt: str = "") -> dict:
    """The prompt as the pipeline takes it: the text itself, T5's window for the flow families (so long prompts
    are not cut at 77 tokens), and the negative prompt where the pipeline has one (FLUX.1 is guidance-distilled:
    it has none)."""
    import inspect

    args = {"prompt": prompt}
    accepted = inspect.signature(type(pipe).__call__).parameters
    if "max_sequence_length" in accepted:
        args["max_sequence_length"] = _text_window(pipe)
    if negative_prompt and "negative_prompt" in accepted and "true_cfg_scale" not in accepted:
        args["negative_prompt"] = negative_prompt
    return args


def _windows_needed(tokenizer, texts: list[str]) -> int:
    """CLIP windows of 75 tokens the longest of ``texts`` fills, at most three."""
    longest = max(len(tokenizer(text, truncation=False).input_ids) - 2 for text in texts)
    return min(3, max(1, -(-longest // 75)))


def _clip_embeds(pipe, prompt: str, negative_prompt: str, clip_skip: int, chunks: int) -> dict:
    """An SD 1.x/2.x/SDXL prompt and negative prompt encoded as training encodes captions
    (``core.base.text.TextEncoders``: clip skip, several CLIP windows)."""
    from core.base.families import detect_pipeline_family
    from core.base.text import TextEncoders

    family = detect_pipeline_family(pipe)
    tokenizers = [getattr(pipe, name.replace("text_encoder", "tokenizer")) for name in family.text_encoders]
    text = TextEncoders(family, tokenizers, [getattr(pipe, name) for name in family.text_encoders])
    text.clip_skip = clip_skip if family.name in ("sd1", "sd2") else 1
    text.chunks = chunks
    (hidden, pooled), (negative, negative_pooled) = (text.encode([t]) for t in (prompt, negative_prompt or ""))
    if not negative_prompt and pipe.config.get("force_zeros_for_empty_prompt", False):  # SDXL, as its pipeline
        negative, negative_pooled = torch.zeros_like(hidden), torch.zeros_like(pooled)
    embeds = {"prompt_embeds": hidden, "negative_prompt_embeds": negative}
    if pooled is not None:
        embeds.update(pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=negative_pooled)
    return embeds


def _flow_family(pipe) -> str | None:
    """The flow family whose pipeline this is (None for the SD families)."""
    from core.base.families import FAMILIES

    return next((f.name for f in FAMILIES.values() if f.flow and f.pipeline_class == type(pipe).__name__), None)


def _text_window(pipe) -> int:
    """The long text encoder's token window of a flow pipeline: T5's 512 for FLUX.1-dev, 256 for schnell and
    SD 3.5; the Qwen3 families' 512."""
    from core.base.families import get_family

    name = _flow_family(pipe)
    return get_family(name).text_lengths(pipe.transformer.config)[-1] if name else 256


# Picture grids (the Prompt tab's checkpoints x strengths, the recommendation's): every cell is shown at least
# CELL_SIDE pixels (a 64 px picture is enlarged, never blurred), with labels in a readable font.
CELL_SIDE = 256
LABEL_WIDTH = 230
NOTE_LINES = 3  # lines under each cell


def image_grid(cells, row_labels: list[str], col_labels: list[str]):
    """Equally sized pictures in a grid: rows labelled with ``row_labels``, columns "strength S"."""
    return draw_grid(cells, [[label] for label in row_labels], [f"strength {text}" for text in col_labels],
                     [[[] for _ in row] for row in cells], None, "")


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # a Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


def upscale(image, side: int = CELL_SIDE):
    """``image`` enlarged by a whole factor (nearest neighbour) until its shorter side is at least ``side``."""
    from PIL import Image

    factor = max(1, -(-side // min(image.size)))
    return image if factor == 1 else image.resize((image.width * factor, image.height * factor),
                                                  Image.Resampling.NEAREST)


def draw_grid(pictures: list[list], row_labels: list[list[str]], col_labels: list[str],
              notes: list[list[list[str]]], winner: tuple[int, int] | None, title: str = ""):
    """Rows of cells (checkpoints × strengths) with labels, score lines under each cell and the winner framed.

    ``pictures[i][j]``: a PIL picture (or None: a grey cell); ``row_labels[i]``: lines left of row i;
    ``notes[i][j]``: lines under cell (i, j).
    """
    from PIL import Image, ImageDraw

    shown = [[upscale(p) if p is not None else None for p in row] for row in pictures]
    sizes = [p.size for row in shown for p in row if p is not None] or [(CELL_SIDE, CELL_SIDE)]
    w, h = max(s[0] for s in sizes), max(s[1] for s in sizes)
    font, small = _font(16), _font(13)
    pad, line = 8, 17
    used = max((min(len(n), NOTE_LINES) for row in notes for n in row), default=0)
    title_h, header_h, note_h = (34 if title else pad), 26, (used * line + 2 * pad if used else 0)
    cell_w, cell_h = w + 2 * pad, h + note_h + pad
    grid = Image.new("RGB", (LABEL_WIDTH + cell_w * len(col_labels), title_h + header_h + cell_h * len(shown)),
                     "white")
    draw = ImageDraw.Draw(grid)
    draw.text((pad, pad), title, fill="black", font=font)
    for j, text in enumerate(col_labels):
        draw.text((LABEL_WIDTH + j * cell_w + pad, title_h + 4), text, fill="black", font=font)
    for i, row in enumerate(shown):
        top = title_h + header_h + i * cell_h
        for k, text in enumerate(row_labels[i]):
            draw.text((pad, top + pad + k * line), text[:30], fill="black", font=small if k else font)
        for j, picture in enumerate(row):
            left = LABEL_WIDTH + j * cell_w + pad
            if picture is None:
                draw.rectangle((left, top + pad, left + w, top + pad + h), fill=(200, 200, 200))
            else:
                grid.paste(picture, (left, top + pad))
            for k, text in enumerate(notes[i][j][:NOTE_LINES]):
                draw.text((left, top + pad + h + 4 + k * line), text, fill="black", font=small)
            if winner == (i, j):
                draw.rectangle((left - pad + 2, top + 2, left + w + pad - 2, top + cell_h - 2), outline=(0, 160, 0),
                               width=5)
    return grid


