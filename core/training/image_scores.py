"""Scores of generated pictures for ``core.training.recommend``, and the grid picture it writes.

* With a CLIP model (``ClipScorer``: a local folder, or a hub id already in the Hugging Face cache; never a
  download): picture and text embeddings, compared by cosine similarity.
* Without one: ``pixel_change``, the mean absolute difference of two pictures (0 = the same, 1 = black
  against white), so how much a LoRA changes other prompts' pictures is measured either way.

``write_tiny_clip`` writes a tiny random-weight CLIP folder (tests and demos: its scores are numbers, not
judgements). torch and transformers are imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Hub ids of CLIP models that clip_model="auto" uses when one of them is already in the local cache.
KNOWN_CLIP_MODELS = ("openai/clip-vit-large-patch14", "openai/clip-vit-base-patch32", "openai/clip-vit-base-patch16")


class ImageScoreError(ValueError):
    """A CLIP model that cannot be used; the message says which and what to do."""


class ClipScorer:
    """A CLIP model and its processor, loaded from local files only, that embeds pictures and prompts.

    Every embedding comes back L2-normalised, so a dot product is a cosine similarity.
    """

    def __init__(self, model: str, device: str | None = None):
        import torch
        from transformers import CLIPModel, CLIPProcessor

        from core.quiet import quiet_transformers

        self.name = str(model)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            with quiet_transformers():
                self.model = CLIPModel.from_pretrained(self.name, local_files_only=True).eval().to(self.device)
                self.processor = CLIPProcessor.from_pretrained(self.name, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ImageScoreError(
                f"CLIP model {self.name!r} is not available on this machine ({type(exc).__name__}: "
                f"{' '.join(str(exc).split())[:200]}); pass a folder with a CLIP model (config.json, weights, "
                f"tokenizer and preprocessor files) or a hub id already in the Hugging Face cache, or leave "
                f"--clip out to judge by validation loss and pixel change only") from None
        self.max_tokens = int(self.model.config.text_config.max_position_embeddings)

    def images(self, pictures: list) -> torch.Tensor:  # noqa: F821 - torch is imported lazily
        """The normalised embeddings of PIL pictures, one row each (in batches of 16)."""
        import torch

        rows = []
        for start in range(0, len(pictures), 16):
            batch = [p.convert("RGB") for p in pictures[start:start + 16]]
            inputs = self.processor(images=batch, return_tensors="pt")
            with torch.no_grad():
                out = self.model.get_image_features(pixel_values=inputs["pixel_values"].to(self.device))
            rows.append(_features(out))
        return _normalise(torch.cat(rows)) if rows else torch.zeros(0, self.model.config.projection_dim)

    def texts(self, prompts: list[str]) -> torch.Tensor:  # noqa: F821
        """The normalised embeddings of prompts (cut at CLIP's token window)."""
        import torch

        inputs = self.processor.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_tokens,
                                          return_tensors="pt")
        with torch.no_grad():
            out = self.model.get_text_features(input_ids=inputs["input_ids"].to(self.device),
                                               attention_mask=inputs["attention_mask"].to(self.device))
        return _normalise(_features(out))


def _features(out):
    """transformers 4 returns the projected embedding; transformers 5 an output whose pooler_output it is."""
    return (out if hasattr(out, "float") else out.pooler_output).float().cpu()


def _normalise(x):
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def mean_cosine(a, b) -> float:
    """Mean cosine similarity of every row of ``a`` with every row of ``b`` (both normalised)."""
    return float((a @ b.T).mean())


def paired_cosine(a, b) -> list[float]:
    """Cosine similarity of row i of ``a`` with row i of ``b`` (both normalised)."""
    return [float(x) for x in (a * b).sum(dim=-1)]


def pixel_change(a, b) -> float:
    """Mean absolute difference of two pictures, 0 (the same) to 1; ``b`` is resized to ``a`` if needed."""
    import numpy as np

    if b.size != a.size:
        b = b.resize(a.size)
    x = np.asarray(a.convert("RGB"), dtype=np.float32)
    y = np.asarray(b.convert("RGB"), dtype=np.float32)
    return float(np.abs(x - y).mean() / 255.0)


def find_local_clip() -> str | None:
    """The first of ``KNOWN_CLIP_MODELS`` already in the local Hugging Face cache (no network), else None."""
    from huggingface_hub import try_to_load_from_cache

    for repo in KNOWN_CLIP_MODELS:
        found = try_to_load_from_cache(repo, "config.json")
        if isinstance(found, str):
            return repo
    return None


def write_tiny_clip(folder: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """A tiny random-weight CLIP model with its processor (the project's in-code tokenizer), for tests and
    demos; ``folder`` must not exist or be empty. Loads with ``ClipScorer(folder)``."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from core.base.tiny_tokenizers import BOS, EOS, build_tokenizer
    from core.fsutil import new_folder
    from core.quiet import quiet_transformers

    tokenizer = build_tokenizer()
    vocab = tokenizer.get_vocab()
    text = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                max_position_embeddings=77, vocab_size=len(vocab) + 8, bos_token_id=vocab[BOS],
                eos_token_id=vocab[EOS], pad_token_id=vocab[EOS])
    vision = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                  image_size=image_size, patch_size=8)
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    images = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                   crop_size={"height": image_size, "width": image_size})
    processor = CLIPProcessor(image_processor=images, tokenizer=tokenizer)
    folder = Path(folder)
    with new_folder(folder) as tmp, quiet_transformers():
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return folder


# ------------------------------------------------------------ rendering and scoring the grid


@dataclass
class GridSetup:
    """What every cell of the grid is drawn with, and the CLIP embeddings shared by all cells."""

    model: str  # the base model
    prompts: list[str]  # prompts that use the trigger (likeness, adherence)
    leak_prompts: list[str]  # prompts without it (leakage)
    seeds: list[int]
    kwargs: dict[str, Any]  # Previewer.generate's steps, guidance_scale, width, height, negative_prompt
    device: str | None = None
    scorer: ClipScorer | None = None
    training: Any = None  # embeddings of the training pictures
    texts: Any = None  # embeddings of the trigger prompts, one per (prompt, seed)
    base_leak: Any = None  # embeddings of the base's pictures of the leak prompts


def training_embeddings(scorer: ClipScorer, folder: str | Path, caption_extension: str,
                        limit: int = 32) -> tuple[Any, str]:
    """CLIP embeddings of up to ``limit`` training pictures (evenly chosen) of a dataset folder, and a note
    ("" when all went well; the embeddings are None when no picture could be read)."""
    from core.data.dataset import DatasetError, planned_pictures
    from core.data.images import ImageError, load_image

    folder = Path(folder)
    try:
        planned = [folder / rel for rel, _ in planned_pictures(folder, caption_extension)]
    except DatasetError as exc:
        return None, f"likeness not measured: {exc}"
    if len(planned) > limit:
        planned = [planned[int(i * len(planned) / limit)] for i in range(limit)]
    pictures = []
    for path in planned:
        try:
            pictures.append(load_image(path, max_side=512))
        except ImageError:
            continue  # the health report names broken pictures; likeness uses the others
    if not pictures:
        return None, f"likeness not measured: no readable training picture in {folder}"
    return scorer.images(pictures), ""


def _draw(previewer, setup: GridSetup, lora: str | None, scale: float) -> dict[tuple[str, int], Any]:
    return {(p, s): previewer.generate(setup.model, p, lora=lora, scale=scale, seed=s, **setup.kwargs)
            for p in setup.prompts + setup.leak_prompts for s in setup.seeds}


def _score(setup: GridSetup, pictures: dict, base: dict) -> dict[str, float | None]:
    trigger = [pictures[(p, s)] for p in setup.prompts for s in setup.seeds]
    leak_keys = [(p, s) for p in setup.leak_prompts for s in setup.seeds]
    changes = [pixel_change(base[k], pictures[k]) for k in leak_keys]
    scores = {"pixel_leakage": _mean(changes) if changes else None}
    if setup.scorer is not None:
        embedded = setup.scorer.images(trigger)
        scores["likeness"] = mean_cosine(embedded, setup.training) if setup.training is not None else None
        scores["adherence"] = _mean(paired_cosine(embedded, setup.texts))
        if leak_keys:
            own = setup.scorer.images([pictures[k] for k in leak_keys])
            scores["leakage"] = 1.0 - _mean(paired_cosine(own, setup.base_leak))
    return scores


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def render_grid(loras: list[str], strengths: list[float], setup: GridSetup, emit) -> tuple[list, dict, list]:
    """Draw and score every (LoRA file, strength) cell against the base model at the same seeds.

    Returns (scores: one dict per cell, row by row; the base's scores; the first trigger prompt's picture
    per cell, row by row). ``emit`` gets Phase("base pictures", ...) and Phase("grid", done, total).
    """
    from core.events import Phase
    from core.lora.preview import Previewer

    previewer = Previewer(setup.device)
    emit(Phase("base pictures", 0, 1))
    base = _draw(previewer, setup, None, 0.0)
    if setup.scorer is not None:
        setup.texts = setup.scorer.texts([p for p in setup.prompts for _ in setup.seeds])
        setup.base_leak = setup.scorer.images([base[(p, s)] for p in setup.leak_prompts for s in setup.seeds])
    base_scores = _score(setup, base, base)
    emit(Phase("base pictures", 1, 1))
    scores, shown, total = [], [], len(loras) * len(strengths)
    first = (setup.prompts[0], setup.seeds[0])
    for lora in loras:
        shown.append([])
        for strength in strengths:
            pictures = _draw(previewer, setup, lora, strength)
            scores.append(_score(setup, pictures, base))
            shown[-1].append(pictures[first])
            emit(Phase("grid", len(scores), total))
    return scores, base_scores, shown


# ------------------------------------------------------------ the grid picture


def recommendation_picture(rec, shown: list):
    """The grid picture of a core.training.recommend.Recommendation: rows checkpoints, columns strengths."""
    from core.base.sample import draw_grid

    n = len(rec.strengths)
    notes = [[[] for _ in range(n)] for _ in rec.checkpoints]
    for k, cell in enumerate(rec.cells):
        notes[cell.checkpoint][k % n] = _cell_notes(cell)
    winner = None
    if rec.winner is not None:
        winner = (rec.cells[rec.winner].checkpoint, rec.winner % n)
    rows = [[r.label, f"val loss {r.validation_loss:.4f}" if r.validation_loss is not None else "not validated",
             Path(r.path).name] for r in rec.checkpoints]
    title = f"recommended: {Path(rec.lora_path).name} at strength {rec.strength:g}"
    return draw_grid(shown, rows, [f"strength {s:g}" for s in rec.strengths], notes, winner, title)


def _cell_notes(cell) -> list[str]:
    lines = []
    if cell.likeness is not None or cell.adherence is not None:
        lines.append(f"like {num(cell.likeness)}  adh {pct(cell.adherence_change)}")
    leak = [f"leak {cell.leakage:.3f}"] if cell.leakage is not None else []
    leak += [f"pixel {cell.pixel_leakage:.3f}"] if cell.pixel_leakage is not None else []
    lines.append("  ".join(leak) or "leakage not measured")
    lines.append("meets the rule" if cell.acceptable else "base (strength 0)" if cell.strength == 0
                 else "fails the rule")
    return lines


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.1%}"


def num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
