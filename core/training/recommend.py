"""Which checkpoint of a finished run (or of a sweep's runs) to use, at what strength, and why.

    rec = recommend("outputs/my-lora", strengths=(0.5, 0.75, 1.0), clip_model="openai/clip-vit-large-patch14")
    rec.lora_path, rec.strength, rec.reasons   # also written: RUN/recommendation.json, RUN/recommendation.png

The rule
--------
1. Checkpoint: the lowest deterministic validation loss (the run's ``ValidationLoss`` events) among the steps
   whose LoRA file is still on disk. The live weights' loss counts; the EMA's only for a run that has no
   other (then its EMA files are the candidates). A step whose file was pruned (output.keep_last_n) or deleted
   cannot be recommended, and the base model's step 0 is a reference, never a pick. A run without validation
   falls back to its final file. The checkpoints of several runs are ranked together.
2. Pictures (unless ``strengths`` is empty): the best ``checkpoints`` files by validation loss, plus the final
   file of the best one's run, are rendered at every strength for the prompts that use the trigger (the run's
   sample prompts that use it unless ``prompts`` is given) and for prompts without it (``leak_prompts``:
   the run's other sample prompts, else general ones), at the same seeds as the base model (strength 0).
   Scores per cell:
   * likeness (CLIP): mean cosine similarity of the trigger prompts' pictures to the training pictures;
   * adherence (CLIP): mean text-picture cosine similarity of the trigger prompts, and its change relative
     to the base model's at the same seeds (``adherence_change``, -0.013 = 1.3 % lower);
   * leakage: how much the LoRA changes the pictures of prompts without the trigger: 1 - cosine similarity
     of the base's and the LoRA's picture (CLIP), and their mean absolute pixel difference, 0-1 (always).
3. Winner: a cell with strength above 0 is *acceptable* when its adherence is at most ``adherence_tolerance``
   (2 %) below the base's and its leakage is at most ``leak_threshold`` (0.10 for CLIP leakage; 0.08 for
   pixel leakage, used without CLIP). With CLIP, the acceptable cell of highest likeness wins (ties: the
   lower validation loss, then the higher strength), whichever checkpoint it is. Without CLIP, the
   validation pick keeps its checkpoint and gets its highest acceptable strength. When no cell is acceptable,
   the validation pick at the lowest strength tried is recommended, and the reasons say so.

The thresholds are starting points, not calibrated on many real runs: every score is in the JSON to judge by.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.training.image_scores import num as _num
from core.training.image_scores import pct as _pct
from core.training.recommend_checkpoints import (  # noqa: F401 - read from here too
    Checkpoint,
    FinishedRun,
    RecommendError,
    checkpoint_of,
    comparability_note,
    rank_checkpoints,
    read_run,
)

DEFAULT_STRENGTHS = (0.5, 0.75, 1.0)
LEAK_PROMPTS = ("a photo of a dog", "a landscape")
ADHERENCE_TOLERANCE = 0.02
CLIP_LEAK_THRESHOLD = 0.10
PIXEL_LEAK_THRESHOLD = 0.08
MAX_TRAINING_PICTURES = 32  # likeness compares with at most this many training pictures (evenly chosen)
JSON_NAME = "recommendation.json"
IMAGE_NAME = "recommendation.png"
RULE = ("checkpoint: lowest validation loss among files on disk; winner: among cells with strength > 0 whose "
        "prompt adherence is at most {tol:.0%} below the base's and whose {leak} leakage is at most {thr:g}, "
        "{how}; none acceptable: the validation pick at the lowest strength tried")


@dataclass
class Cell:
    """One checkpoint at one strength: its scores (None: not measured)."""

    checkpoint: int  # index into Recommendation.checkpoints (the grid's row)
    strength: float
    likeness: float | None = None
    adherence: float | None = None
    adherence_change: float | None = None
    leakage: float | None = None  # CLIP: 1 - cosine similarity to the base's pictures (prompts without trigger)
    pixel_leakage: float | None = None  # mean absolute pixel difference to the base's pictures, 0-1
    acceptable: bool = False


@dataclass
class Recommendation:
    lora_path: str
    run_dir: str
    step: int
    strength: float
    validation_loss: float | None
    loss_kind: str  # which losses ranked the checkpoints: "live", "ema", "mixed" or "none"
    reasons: list[str]
    checkpoints: list[Checkpoint]  # the grid's rows (the validation pick first)
    ranked: list[Checkpoint]  # every checkpoint with a loss and a file, lowest loss first
    strengths: list[float]  # the grid's columns
    cells: list[Cell] = field(default_factory=list)
    base: dict[str, float | None] = field(default_factory=dict)  # the base model's likeness and adherence
    winner: int | None = None  # index into cells
    clip_model: str | None = None
    rule: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    runs: list[str] = field(default_factory=list)
    json_path: str = ""
    image_path: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        lines = [f"recommended: {self.lora_path} at strength {self.strength:g}"]
        lines += [f"  - {reason}" for reason in self.reasons]
        if self.image_path:
            lines.append(f"grid: {self.image_path}")
        if self.json_path:
            lines.append(f"scores: {self.json_path}")
        return "\n".join(lines)


# ------------------------------------------------------------ step 3: the winner


def pick_winner(cells: list[Cell], rows: list[Checkpoint], clip: bool, tolerance: float,
                threshold: float) -> tuple[int | None, str]:
    """Mark the acceptable cells (see the module docstring) and return (the winner's index, the reason)."""
    for cell in cells:
        ok = cell.strength > 0
        if clip and cell.adherence_change is not None:
            ok = ok and cell.adherence_change >= -tolerance
        leak = cell.leakage if clip else cell.pixel_leakage
        cell.acceptable = ok and (leak is None or leak <= threshold)
    acceptable = [i for i, c in enumerate(cells) if c.acceptable]
    by_likeness = clip and all(cells[i].likeness is not None for i in acceptable)
    leak_name = "CLIP leakage" if clip else "pixel change of prompts without the trigger"
    if by_likeness and acceptable:
        win = max(acceptable, key=lambda i: (round(cells[i].likeness, 6), -cells[i].checkpoint, cells[i].strength))
        c = cells[win]
        return win, (f"strength {c.strength:g} of {rows[c.checkpoint].label}: the highest likeness "
                     f"{c.likeness:.3f} among the {len(acceptable)} of {len(cells)} cells that keep prompt adherence "
                     f"within {tolerance:.0%} of the base's (this one {_pct(c.adherence_change)}) and {leak_name} "
                     f"at most {threshold:g} (this one {_num(c.leakage)})")
    own = [i for i in acceptable if cells[i].checkpoint == 0]
    if own:
        win = max(own, key=lambda i: cells[i].strength)
        c = cells[win]
        kept = f"keeps {leak_name} at most {threshold:g} ({_num(c.leakage if clip else c.pixel_leakage)})"
        if clip:
            kept += f" and prompt adherence within {tolerance:.0%} of the base's ({_pct(c.adherence_change)})"
        return win, f"strength {c.strength:g}: the highest strength tried that {kept}"
    tried = [i for i, c in enumerate(cells) if c.checkpoint == 0 and c.strength > 0]
    if not tried:
        return None, "strength 1.0 by default: no strength above 0 was compared"
    win = min(tried, key=lambda i: cells[i].strength)
    return win, (f"no strength met the rule (prompt adherence within {tolerance:.0%} of the base's and "
                 f"{leak_name} at most {threshold:g}); the lowest strength tried, {cells[win].strength:g}, is "
                 f"recommended: try lower strengths or an earlier checkpoint")


# ------------------------------------------------------------ the whole judgement


def recommend(run_dir: str | Path | Sequence[str | Path], strengths: Sequence[float] = DEFAULT_STRENGTHS,
              clip_model: str | None = None, prompts: Sequence[str] | None = None, seed: int = 0,
              steps: int | None = None, device: str | None = None, emit: Callable | None = None, *,
              leak_prompts: Sequence[str] | None = None, checkpoints: int = 3, images_per_prompt: int = 1,
              adherence_tolerance: float = ADHERENCE_TOLERANCE, leak_threshold: float | None = None,
              model: str | None = None, out_dir: str | Path | None = None, write: bool = True) -> Recommendation:
    """Recommend a checkpoint and a strength of a finished run, or of several runs (a sweep), with reasons.

    ``strengths``: the grid's columns (empty: no pictures, the checkpoint by validation loss alone at 1.0);
    ``clip_model``: a local CLIP folder or cached hub id, "auto" for a known one in the cache, None for none
    (leakage is then the pixel change); ``prompts``: prompts with the trigger (default: the run's sample
    prompts that use the trigger, or all of them when none does, else "a photo of TRIGGER"); ``leak_prompts``:
    prompts without it (default: the run's sample prompts without the trigger when others use it, else
    LEAK_PROMPTS); ``seed``: of the first picture per prompt (``images_per_prompt``
    count up from it); ``steps``: denoising steps (default: the run's sample.steps); ``checkpoints``: how many
    of the best files by validation loss are rows (the final file of the best one's run is added);
    ``model``: the base model when it moved (default: the run's model.path). ``emit`` gets Phase events
    ("grid", done, total). Writes recommendation.json and recommendation.png into ``out_dir`` (default: the
    recommended file's run folder) unless ``write`` is false. The rule is in this module's docstring.
    Raises RecommendError for input that cannot be judged, ImageScoreError for a CLIP model that cannot be
    loaded, and core.base.models.ModelError for a base model that cannot be.
    """
    from core.events import Message

    emit = emit or (lambda event: None)
    dirs = [run_dir] if isinstance(run_dir, (str, Path)) else list(run_dir)
    if not dirs:
        raise RecommendError("no run folder given: pass the folder of a finished run (OUTPUT_DIR/NAME)")
    strengths = _check_settings(strengths, checkpoints, images_per_prompt, steps)
    runs = [read_run(d) for d in dirs]
    _check_same_base(runs, model)
    ranked, fallbacks, reasons, kind = rank_checkpoints(runs)
    note = comparability_note(runs) if len(runs) > 1 and ranked else None
    rows = _rows(ranked, fallbacks, runs, checkpoints)
    pick = rows[0]
    rec = Recommendation(pick.path, pick.run, pick.step, 1.0, pick.validation_loss, kind,
                         reasons + ([note] if note else []), rows if strengths else [pick], ranked, strengths,
                         runs=[str(r.dir) for r in runs])
    shown = []
    if strengths:
        run = next(r for r in runs if str(r.dir) == pick.run)
        setup = _setup(run, model, prompts, leak_prompts, seed, images_per_prompt, steps, device, rec.reasons)
        shown = _judge_pictures(rec, run.config, setup, clip_model, adherence_tolerance, leak_threshold, emit)
    else:
        rec.reasons.append("strength 1.0 by default: no pictures were compared (no strengths given)")
    if write:
        _write(rec, out_dir, shown)
    emit(Message("info", f"recommended {Path(rec.lora_path).name} at strength {rec.strength:g}"))
    return rec


def _check_settings(strengths, checkpoints: int, images_per_prompt: int, steps: int | None) -> list[float]:
    values = []
    for value in strengths:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise RecommendError(f"strength {value!r} is not a number; give strengths such as 0.5,0.75,1") from None
        if not math.isfinite(number) or number < 0:
            raise RecommendError(f"strength {value!r} must be a number of 0 or more (0.5-1 is usual)")
        values.append(number)
    for name, value in (("checkpoints", checkpoints), ("images_per_prompt", images_per_prompt)):
        if value < 1:
            raise RecommendError(f"{name} must be 1 or more, not {value}")
    if steps is not None and steps < 1:
        raise RecommendError(f"steps must be 1 or more, not {steps} (leave it out for the run's sample.steps)")
    return sorted(set(values))


def _check_same_base(runs: list[FinishedRun], model: str | None) -> None:
    models = sorted({r.config.model.path for r in runs})
    if len(models) > 1 and model is None:
        raise RecommendError(f"the runs were trained on different base models ({', '.join(models)}); recommend "
                             f"each base model's runs separately")


def _rows(ranked: list[Checkpoint], fallbacks: list[Checkpoint], runs: list[FinishedRun],
          count: int) -> list[Checkpoint]:
    """The grid's rows: the best ``count`` by validation loss and the final file of the best one's run."""
    if not ranked:
        return fallbacks[:count + 1]
    rows = ranked[:count]
    best = rows[0]
    run = next(r for r in runs if str(r.dir) == best.run)
    final = run.file(run.final_step, best.ema)
    if final is not None and str(final) not in {r.path for r in rows}:
        loss = (run.ema if best.ema else run.live).get(run.final_step)
        rows.append(checkpoint_of(run, run.final_step, final, loss, best.ema, len(runs) > 1))
    return rows


def _setup(run: FinishedRun, model: str | None, prompts, leak_prompts, seed: int, count: int, steps: int | None,
           device: str | None, reasons: list[str]):
    from core.training.image_scores import GridSetup

    c = run.config
    trigger = c.output.trigger_phrase.strip()
    own = [p for p in c.sample.prompts if p.strip()]
    with_trigger = [p for p in own if trigger and trigger.lower() in p.lower()]
    if leak_prompts is None:  # the run's sample prompts without the trigger (when others use it), else general ones
        leak_prompts = (with_trigger and [p for p in own if p not in with_trigger]) or list(LEAK_PROMPTS)
    if prompts:
        chosen = [p for p in prompts if p.strip()]
    elif own:
        chosen = with_trigger or own
    elif trigger:
        chosen = [f"a photo of {trigger}"]
    else:
        raise RecommendError(f"run {run.name} has no sample prompts (sample.prompts) and no trigger phrase "
                             f"(output.trigger_phrase); pass the prompts to judge with (--prompt TEXT)")
    if not chosen:
        raise RecommendError("the prompts are empty; pass at least one prompt that uses the trigger")
    leak = [p for p in leak_prompts if p.strip() and not (trigger and trigger.lower() in p.lower())]
    if len(leak) < len([p for p in leak_prompts if p.strip()]):
        reasons.append(f"prompts that contain the trigger {trigger!r} were left out of the leakage prompts")
    kwargs = dict(steps=steps or c.sample.steps, guidance_scale=c.sample.guidance_scale,
                  width=c.sample.width or c.dataset.resolution, height=c.sample.height or c.dataset.resolution,
                  negative_prompt=c.sample.negative_prompt)
    return GridSetup(model or c.model.path, chosen, leak, list(range(seed, seed + count)), kwargs, device)


def _judge_pictures(rec: Recommendation, config, setup, clip_model: str | None, tolerance: float,
                    leak_threshold: float | None, emit) -> list:
    """Render and score the grid, pick the winner and record it in ``rec``; returns the pictures shown."""
    from core.training.image_scores import ClipScorer, find_local_clip, render_grid, training_embeddings

    if clip_model == "auto":
        clip_model = find_local_clip()
        if clip_model is None:
            rec.reasons.append("no known CLIP model is in the local Hugging Face cache (clip 'auto')")
    if clip_model:
        setup.scorer = ClipScorer(clip_model, setup.device)
        setup.training, note = training_embeddings(setup.scorer, config.dataset.path,
                                                   config.dataset.caption_extension, MAX_TRAINING_PICTURES)
        if note:
            rec.reasons.append(note)
    clip = setup.scorer is not None
    threshold = leak_threshold if leak_threshold is not None else CLIP_LEAK_THRESHOLD if clip else PIXEL_LEAK_THRESHOLD
    scores, base, shown = render_grid([r.path for r in rec.checkpoints], rec.strengths, setup, emit)
    n = len(rec.strengths)
    rec.cells = [Cell(k // n, rec.strengths[k % n], **s) for k, s in enumerate(scores)]
    for cell in rec.cells:
        if cell.adherence is not None and base.get("adherence"):
            cell.adherence_change = (cell.adherence - base["adherence"]) / abs(base["adherence"])
    rec.base = {"likeness": base.get("likeness"), "adherence": base.get("adherence")}
    rec.winner, reason = pick_winner(rec.cells, rec.checkpoints, clip, tolerance, threshold)
    if rec.winner is not None:
        cell = rec.cells[rec.winner]
        row = rec.checkpoints[cell.checkpoint]
        rec.lora_path, rec.run_dir, rec.step, rec.validation_loss = row.path, row.run, row.step, row.validation_loss
        rec.strength = cell.strength
        if cell.checkpoint != 0:
            rec.reasons.append(f"the pictures favour {row.label} over the validation pick "
                               f"{rec.checkpoints[0].label}")
    rec.reasons.append(reason)
    if not clip:
        rec.reasons.append("no CLIP model was used (--clip), so likeness and prompt adherence were not measured; "
                           "leakage is the mean pixel change of prompts without the trigger")
    rec.clip_model = setup.scorer.name if clip else None
    how = "highest likeness" if clip else "the validation pick's highest strength"
    rec.rule = RULE.format(tol=tolerance, leak="CLIP" if clip else "pixel", thr=threshold, how=how)
    rec.settings = {"model": setup.model, "prompts": setup.prompts, "leak_prompts": setup.leak_prompts,
                    "seeds": setup.seeds, **setup.kwargs, "device": setup.device, "clip_model": rec.clip_model,
                    "strengths": rec.strengths, "checkpoints": len(rec.checkpoints),
                    "adherence_tolerance": tolerance, "leak_threshold": threshold}
    return shown


# ------------------------------------------------------------ what is written


def _write(rec: Recommendation, out_dir: str | Path | None, shown: list) -> None:
    """recommendation.json (and, with pictures, recommendation.png), each written atomically."""
    from core.fsutil import save_image, write_json
    from core.training.image_scores import recommendation_picture

    folder = Path(out_dir) if out_dir else Path(rec.run_dir)
    rec.json_path = str(folder / JSON_NAME)
    if shown:
        rec.image_path = str(folder / IMAGE_NAME)
        save_image(rec.image_path, recommendation_picture(rec, shown))
    else:
        (folder / IMAGE_NAME).unlink(missing_ok=True)  # an earlier grid would not match this recommendation
    write_json(rec.json_path, rec.to_dict())
