"""The dataset health report: what in a training folder will hurt the LoRA, before any model loads.

``check_dataset(folder)`` looks at every image the trainer would use (the
same folder walk as ``core.data.dataset.scan_dataset``: hidden files skipped,
captions and sidecars not images) and reports, per file, what is wrong and
what to do about it:

=================  =======  ==================================================
check              status   when
=================  =======  ==================================================
``unreadable``     error    undecodable (truncated, empty, HEIC, SVG, RAW) or a bad link
``small``          warning  shorter side below the training resolution
``aspect``         warning  longer side over 2.5 times the shorter
``duplicate``      warning  same pixels as an earlier file (after EXIF rotation)
``near_duplicate`` warning  perceptual hash within ``near_threshold`` bits
``blurry``         warning  variance of the Laplacian below ``blur_threshold``
``uniform``        warning  greyscale standard deviation below 3
``caption_*``      warning  caption file missing, empty, or over 75 CLIP tokens (``max_tokens``)
``trigger_missing`` warning the trigger word is not in the caption
``mask_*``         warning  loss mask (``NAME.mask.png``) unreadable, or masking everything out
=================  =======  ==================================================

Pictures with a loss mask (their ``NAME.mask.png``, or transparency) are listed
with the share of the picture it masks out (``dataset.masked_loss`` uses them).

Decisions recorded in the dataset's ``dataset.toml`` (see ``core.data.manifest``) are shown per
file; excluded images do not count towards duplicates, tags or captions.

Only Pillow and numpy: no model is loaded unless the caller passes a
tokenizer (the CLI's ``--model`` loads just the CLIP tokenizer).
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from core.data.dataset import (
    CAPTION_EXTENSION,
    NEAR_THRESHOLD,
    candidate_files,
    open_dataset,
    read_caption,
    similar_groups,
)
from core.data.dataset import caption_path as caption_file
from core.data.images import ImageError, dhash, load_image, looks_like_picture

__all__ = ["NEAR_THRESHOLD", "dhash", "check_dataset", "format_report", "tag_frequency"]

# Giant pictures are decoded with about this many pixels on the short side (blur is measured at 512 px).
DECODE_SIDE = 1024
JSON_VERSION = 1
CLIP_TOKENS = 75  # CLIP's 77 positions minus BOS and EOS
MAX_ASPECT = 2.5
# Variance of the Laplacian on 0..255 greyscale, measured at most 512 px on
# the long side (the scale the model sees). The classic OpenCV rule of thumb
# is 100 at full resolution; at 512 px in-focus photos and line art score in
# the hundreds or thousands, while a Gaussian blur of radius 2+ brings them
# under ~30. 60 sits between, low enough that soft but focused portraits
# (shallow depth of field) are not flagged.
BLUR_THRESHOLD = 60.0
UNIFORM_STD = 3.0  # greyscale std below this: a flat fill, nothing to learn
_MEASURE_SIDE = 512  # long side of the greyscale copy used for blur/uniform
_MIN_MEASURE_SIDE = 64  # ... unless that would squash a strip's short side below this


@dataclass
class FileFinding:
    """Everything wrong with one file, and the decision about it in dataset.toml (if any)."""

    file: str  # relative to the checked folder, posix separators
    status: str  # "error", "warning", or "ok" (listed only for its dataset.toml decision)
    checks: list[dict] = field(default_factory=list)  # {"check": code, "message": text}
    decision: str | None = None  # from dataset.toml: "exclude", "keep" or None (not decided)

    def to_json(self) -> dict:
        return {"file": self.file, "status": self.status, "checks": [dict(c) for c in self.checks],
                "decision": self.decision}


@dataclass
class HealthReport:
    folder: str
    resolution: int
    summary: dict
    files: list[FileFinding]
    duplicate_groups: list[list[str]]
    near_duplicate_groups: list[list[str]]
    tag_frequency: list[tuple[str, int]]
    masks: list[dict] = field(default_factory=list)  # {"file", "source": "file"|"alpha", "masked": 0..1}

    def to_json(self) -> dict:
        """The report as plain JSON types. Layout (version 1)::

            {"version": 1, "folder": str, "resolution": int,
             "summary": {"images", "usable", "errors", "warnings", "excluded", "kept", "captioned",
                         "uncaptioned", "duplicate_groups", "near_duplicate_groups": int,
                         "tokens_checked": bool, "caption_style": "tags"|"sentences"},
             "files": [{"file": str, "status": "error"|"warning"|"ok",
                        "checks": [{"check": str, "message": str}],
                        "decision": "exclude"|"keep"|null}],
             "duplicate_groups": [[str]], "near_duplicate_groups": [[str]],
             "tag_frequency": [{"tag": str, "count": int}],
             "masks": [{"file": str, "source": "file"|"alpha", "masked": float}]}
        """
        return {
            "version": JSON_VERSION,
            "folder": self.folder,
            "resolution": self.resolution,
            "summary": dict(self.summary),
            "files": [f.to_json() for f in self.files],
            "duplicate_groups": [list(g) for g in self.duplicate_groups],
            "near_duplicate_groups": [list(g) for g in self.near_duplicate_groups],
            "tag_frequency": [{"tag": tag, "count": count} for tag, count in self.tag_frequency],
            "masks": [dict(m) for m in self.masks],
        }


@dataclass
class _Image:
    """What the checks need from one decoded image (the pixels themselves are not kept)."""

    rel: str
    size: tuple[int, int]
    pixel_hash: str
    dhash: int
    sharpness: float | None  # None when the image is too thin to measure
    grey_std: float


# --------------------------------------------------------------------------
# the report


def model_tokenizer(model: str | Path):
    """The CLIP tokenizer of a model (what counts a caption's tokens): a diffusers folder's ``tokenizer/``,
    or, for a single-file checkpoint, that of its converted copy once it has one. DatasetError says what to
    pass otherwise. Only the tokenizer is loaded (no weights)."""
    from transformers import CLIPTokenizer

    from core.data.dataset import DatasetError

    folder = Path(model)
    if folder.is_file():
        from core.base.checkpoints import converted_folder

        folder = converted_folder(folder)
    if not (folder / "tokenizer").is_dir():
        raise DatasetError(f"model {model}: no tokenizer/ folder there (a single-file model gets one when it is "
                           f"first trained or converted); pass a diffusers model folder")
    try:
        return CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    except (OSError, ValueError) as exc:
        message = " ".join(str(exc).split())
        raise DatasetError(f"cannot load the CLIP tokenizer from {folder / 'tokenizer'} ({message}); pass a "
                           f"diffusers model folder") from None


def check_dataset(folder, resolution: int = 512, tokenizer=None, trigger: str = "",
                  blur_threshold: float = BLUR_THRESHOLD, near_threshold: int = NEAR_THRESHOLD,
                  caption_extension: str = CAPTION_EXTENSION, max_tokens: int = CLIP_TOKENS) -> HealthReport:
    """Check every image under ``folder`` and its caption; raise DatasetError if there is no folder.

    ``tokenizer`` (a CLIP tokenizer) enables the caption length check;
    ``trigger`` enables the trigger word check; ``caption_extension`` is the
    training config's (dataset.caption_extension); ``max_tokens`` its dataset.max_token_length.
    """
    folder, manifest = open_dataset(folder)
    findings: dict[str, list[dict]] = {}
    errors: set[str] = set()
    images: list[_Image] = []
    captions: list[str] = []
    masks: list[dict] = []
    captioned = 0

    def flag(rel: str, check: str, message: str) -> None:
        findings.setdefault(rel, []).append({"check": check, "message": message})

    specials = len(tokenizer("")["input_ids"]) if tokenizer is not None else 0
    links: list[tuple[Path, str]] = []  # symbolic links that are not used, and why
    for path in candidate_files(folder, caption_extension, unusable=links):
        rel = path.relative_to(folder).as_posix()
        try:
            image = load_image(path, max_side=DECODE_SIDE)
        except ImageError as exc:
            if looks_like_picture(path):  # other files that do not decode are simply not pictures
                flag(rel, "unreadable", f"cannot be used: {exc.reason}")
                errors.add(rel)
            continue
        with image:
            info = _measure(rel, image)
        images.append(info)
        mask = _mask_check(path, rel, info.size, flag)
        if mask is not None and not manifest.is_excluded(rel):
            masks.append(mask)
        for check, message in _image_checks(info, resolution, blur_threshold):
            flag(rel, check, message)
        caption = _caption_checks(caption_file(path, caption_extension), rel, tokenizer, specials, trigger, flag,
                                  max_tokens)
        if manifest.is_excluded(rel):
            continue  # reported, but not part of the training set: its caption and copies do not count
        if caption is not None:
            captioned += 1
            captions.append(caption)

    for path, reason in links:
        rel = path.relative_to(folder).as_posix()
        flag(rel, "unreadable", f"skipped: {reason}")
        errors.add(rel)

    excluded = {info.rel for info in images if manifest.is_excluded(info.rel)}
    training = [info for info in images if info.rel not in excluded]
    duplicate_groups = _exact_groups(training)
    for group in duplicate_groups:
        for rel in group[1:]:
            flag(rel, "duplicate", f"same pixels as {group[0]}: remove one copy (a duplicate trains twice as "
                                   "often and pushes the LoRA towards that one picture)")
    in_exact = {rel for group in duplicate_groups for rel in group[1:]}
    near_groups, closest = _near_groups([i for i in training if i.rel not in in_exact], near_threshold)
    for group in near_groups:
        for rel in group[1:]:
            other, distance = closest[rel]
            flag(rel, "near_duplicate", f"looks almost the same as {other} (perceptual hash distance {distance} "
                                        f"of 64, threshold {near_threshold}): keep one unless they differ on "
                                        "purpose")

    for info in images:  # decided files stay listed (so a decision can be undone) even with nothing to flag
        if manifest.decision(info.rel) is not None:
            findings.setdefault(info.rel, [])
    files = [FileFinding(rel, "error" if rel in errors else "warning" if checks else "ok", checks,
                         manifest.decision(rel))
             for rel, checks in sorted(findings.items())]
    summary = {
        "caption_style": caption_style(captions),
        "images": len(images) + len(errors),
        "usable": len(training),
        "errors": len(errors),
        "warnings": sum(1 for f in files if f.status == "warning" and f.decision is None),
        "excluded": len(excluded),
        "kept": sum(1 for f in files if f.decision == "keep"),
        "captioned": captioned,
        "uncaptioned": len(training) - captioned,
        "duplicate_groups": len(duplicate_groups),
        "near_duplicate_groups": len(near_groups),
        "tokens_checked": tokenizer is not None,  # caption token length is only measured with a tokenizer
        "masked": len(masks),
    }
    return HealthReport(str(folder), resolution, summary, files, duplicate_groups, near_groups,
                        tag_frequency(captions), masks)


def _image_checks(info: _Image, resolution: int, blur_threshold: float):
    """(check, message) pairs for the pixel checks of one image."""
    w, h = info.size
    if min(w, h) < resolution:
        yield "small", (f"{w}×{h} is below the training resolution {resolution}: it will be upscaled and look "
                        "soft; use a larger original or a lower resolution")
    ratio = max(w, h) / min(w, h)
    if ratio > MAX_ASPECT:
        kept = f"{100 / ratio:.2g}"
        yield "aspect", (f"{w}×{h} has an aspect ratio of {ratio:.1f}:1 (beyond {MAX_ASPECT}:1): it will be "
                         f"cropped heavily (a square crop keeps {kept}% of it); crop it yourself to the part "
                         "that matters")
    if info.grey_std < UNIFORM_STD:
        yield "uniform", (f"nearly uniform (brightness std {info.grey_std:.1f}, below {UNIFORM_STD:g}): there is "
                          "nothing to learn in it; remove it")
    elif info.sharpness is not None and info.sharpness < blur_threshold:
        yield "blurry", (f"looks blurry (sharpness {info.sharpness:.1f}, below {blur_threshold:g}): the LoRA "
                         "learns blur from it; use a sharper original or remove it")


def _caption_checks(caption_path: Path, rel: str, tokenizer, specials: int, trigger: str, flag,
                    max_tokens: int = CLIP_TOKENS) -> str | None:
    """Flag caption problems; return the caption text, or None when there is no usable caption."""
    if not caption_path.is_file():
        flag(rel, "caption_missing", f"no caption file {caption_path.name}: it trains with an empty caption; "
                                     "write one (or run the captioner)")
        return None
    caption = read_caption(caption_path)
    if not caption:
        flag(rel, "caption_empty", f"caption file {caption_path.name} is empty: it trains with an empty "
                                   "caption; write one")
        return None
    if tokenizer is not None:
        tokens = len(tokenizer(caption, truncation=False)["input_ids"]) - specials
        if tokens > max_tokens:
            more = (f"shorten it, or set dataset.max_token_length to {min(225, -(-tokens // 75) * 75)}"
                    if max_tokens < 225 and tokens <= 225 else "shorten it")
            limit = f"CLIP's {CLIP_TOKENS}" if max_tokens == CLIP_TOKENS else f"dataset.max_token_length = {max_tokens}"
            flag(rel, "caption_too_long", f"caption is {tokens} tokens, over {limit}: the last "
                                          f"{tokens - max_tokens} are cut off in training; {more}")
    if trigger and not re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", caption, re.IGNORECASE):
        flag(rel, "trigger_missing", f"caption does not contain the trigger word {trigger!r}: add it so the "
                                     "LoRA ties what it learns to the trigger")
    return caption


def _mask_check(path: Path, rel: str, size: tuple[int, int], flag) -> dict | None:
    """The picture's loss mask as a report entry (how much of the picture it masks out), or None."""
    from core.data.masks import load_mask, mask_path

    try:
        mask = load_mask(path, size)
    except ImageError as exc:
        flag(rel, "mask_unreadable", f"its mask {mask_path(path).name} cannot be read ({exc.reason}): with "
                                     f"dataset.masked_loss the run stops; re-export the mask as a PNG")
        return None
    if mask is None:
        return None
    with mask:
        kept = float(np.asarray(mask.reduce(max(1, max(mask.size) // 256)), dtype=np.float32).mean() / 255)
    source = "file" if mask_path(path).is_file() else "alpha"
    if kept < 0.01:
        what = mask_path(path).name if source == "file" else "its transparency"
        flag(rel, "mask_empty", f"{what} masks out the whole picture: with dataset.masked_loss it trains "
                                f"nothing; fix the mask or remove the picture")
    return {"file": rel, "source": source, "masked": round(1 - kept, 3)}


# Words a sentence caption is made of that say nothing about the picture (for the word counts).
_FILLER = set("a an the of on in at and with to is are its it this that from by for as his her their there "
              "near next over under some two three".split())


def caption_style(captions: list[str]) -> str:
    """"tags" when most captions are comma-separated lists of short tags (WD14, booru), else "sentences"
    (BLIP, Florence-2, hand-written prose), whose commas separate clauses, not tags."""
    def tag_like(caption: str) -> bool:
        parts = [p.strip() for p in caption.split(",") if p.strip()]
        short = sum(len(p.split()) <= 3 for p in parts) >= 0.8 * len(parts)
        return bool(parts) and short and (len(parts) >= 2 or len(parts[0].split()) <= 2)

    return "tags" if captions and sum(map(tag_like, captions)) * 2 > len(captions) else "sentences"


def tag_frequency(captions: list[str]) -> list[tuple[str, int]]:
    """What the captions keep saying, most common first, then by name: the comma-separated tags (lower-cased)
    of tag captions; for sentence captions, the words that carry meaning (a sentence is not one "tag", and
    "a", "of" and "the" are in every one). Each is counted once per caption."""
    if caption_style(captions) == "tags":
        items = ({t.strip().lower() for t in caption.split(",") if t.strip()} for caption in captions)
    else:
        items = ({w for w in re.findall(r"[\w'-]+", caption.lower()) if w not in _FILLER and not w.isdigit()}
                 for caption in captions)
    counts = Counter(item for caption_items in items for item in caption_items)
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))


def comma_tag_counts(captions: list[str]) -> list[tuple[str, int]]:
    """Every comma-separated part (lower-cased) with its count, most common first: the convention of the
    ``ss_tag_frequency`` metadata other tools read, whatever the captions' style."""
    counts = Counter(tag for caption in captions for tag in (t.strip().lower() for t in caption.split(",")) if tag)
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))


def recount(report: HealthReport) -> dict:
    """The summary's decision counts again, after decisions changed (no picture is read again): excluded,
    kept, usable and the warnings still undecided."""
    unreadable = {f.file for f in report.files if f.status == "error"}
    was_excluded = report.summary["excluded"]
    excluded = sum(1 for f in report.files if f.decision == "exclude" and f.file not in unreadable)
    readable = report.summary["usable"] + was_excluded
    return {**report.summary, "excluded": excluded, "usable": readable - excluded,
            "kept": sum(1 for f in report.files if f.decision == "keep"),
            "warnings": sum(1 for f in report.files if f.status == "warning" and f.decision is None)}


# --------------------------------------------------------------------------
# measurements


def _measure(rel: str, image: Image.Image) -> _Image:
    """Hash and measure one upright RGB image (a giant one decoded reduced; its true size is in its info)."""
    size = image.info.get("original_size", image.size)
    digest = hashlib.sha256(f"{size[0]}x{size[1]}:".encode())
    digest.update(image.tobytes())
    grey = image.convert("L")
    small = np.asarray(_measure_copy(grey), dtype=np.float64)
    return _Image(rel, size, digest.hexdigest(), dhash(grey), laplacian_variance(small), float(small.std()))


def _measure_copy(grey: Image.Image) -> Image.Image:
    """Greyscale at most _MEASURE_SIDE on the long side, keeping a strip's short side measurable."""
    long_side, short_side = max(grey.size), min(grey.size)
    scale = min(1.0, _MEASURE_SIDE / long_side)
    if short_side * scale < _MIN_MEASURE_SIDE:
        scale = min(1.0, _MIN_MEASURE_SIDE / short_side)
    if scale >= 1.0:
        return grey
    size = (max(1, round(grey.width * scale)), max(1, round(grey.height * scale)))
    return grey.resize(size, Image.Resampling.BOX)


def laplacian_variance(grey: np.ndarray) -> float | None:
    """Variance of the 3×3 Laplacian (0 1 0 / 1 -4 1 / 0 1 0); None for images under 3 px on a side."""
    g = np.asarray(grey, dtype=np.float64)
    if g.shape[0] < 3 or g.shape[1] < 3:
        return None
    lap = g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:] - 4.0 * g[1:-1, 1:-1]
    return float(lap.var())


# --------------------------------------------------------------------------
# grouping


def _exact_groups(images: list[_Image]) -> list[list[str]]:
    """Files with identical pixels, each group in walk order, groups by their first file."""
    by_hash: dict[str, list[str]] = {}
    for info in images:
        by_hash.setdefault(info.pixel_hash, []).append(info.rel)
    return [group for group in by_hash.values() if len(group) > 1]


def _near_groups(images: list[_Image], threshold: int) -> tuple[list[list[str]], dict[str, tuple[str, int]]]:
    """Groups of near-duplicates (by relative path); also each member's closest partner and distance."""
    groups = [g for g in similar_groups([info.dhash for info in images], threshold) if len(g) > 1]
    closest: dict[str, tuple[str, int]] = {}
    for group in groups:
        for a in group:
            distance, b = min(((images[a].dhash ^ images[b].dhash).bit_count(), b) for b in group if b != a)
            closest[images[a].rel] = (images[b].rel, distance)
    return [[images[i].rel for i in g] for g in groups], closest


# --------------------------------------------------------------------------
# text output


def format_report(report: HealthReport, top_tags: int = 20) -> str:
    """The report as lines a person reads in a terminal."""
    s = report.summary
    lines = [
        f"dataset {report.folder} at resolution {report.resolution}",
        f"images: {s['images']} ({s['usable']} usable, {s['errors']} unreadable, {s['excluded']} excluded)",
        f"files with warnings: {s['warnings']} (plus {s['kept']} kept on purpose)",
        f"captions: {s['captioned']} captioned, {s['uncaptioned']} without a caption",
        f"duplicate groups: {s['duplicate_groups']} exact, {s['near_duplicate_groups']} near",
    ]
    if not s["tokens_checked"]:
        lines.append("caption token length: not checked (pass --model MODEL to check it with its CLIP tokenizer)")
    if report.files:
        lines.append("")
        marks = {"exclude": " [excluded]", "keep": " [kept]", None: ""}
        lines += [f"{f.file}{marks[f.decision]}: {f.status}: " + "; ".join(c["message"] for c in f.checks)
                  for f in report.files]
    for title, groups in (("exact duplicates", report.duplicate_groups),
                          ("near duplicates", report.near_duplicate_groups)):
        if groups:
            lines += ["", f"{title}:"] + [f"  {', '.join(group)}" for group in groups]
    if report.masks:
        lines += ["", f"loss masks (dataset.masked_loss): {len(report.masks)} picture(s)"]
        source = {"file": "its .mask.png", "alpha": "transparency"}
        lines += [f"  {m['file']}: {m['masked']:.0%} masked out (from {source[m['source']]})" for m in report.masks]
    if report.tag_frequency:
        what = "tags" if s.get("caption_style") == "tags" else "words"
        lines += ["", f"most common {what} (of {len(report.tag_frequency)}):"]
        lines += [f"  {count:4d}  {_shorten(tag)}" for tag, count in report.tag_frequency[:top_tags]]
    return "\n".join(lines)


def _shorten(text: str, limit: int = 60) -> str:
    """One terminal line for a tag (a whole sentence without commas is one "tag")."""
    return text if len(text) <= limit else text[: limit - 3] + "..."
