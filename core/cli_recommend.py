"""``python -m core recommend``: which checkpoint of a finished run (or of a sweep's runs) to use, at what strength.

    python -m core recommend RUN_DIR [RUN_DIR ...] [--clip MODEL|auto] [--strengths 0.5,0.75,1]
                             [--prompt TEXT ...] [--leak-prompt TEXT ...] [--seed N] [--steps K]
                             [--checkpoints N] [--images-per-prompt N] [--model MODEL] [--device cpu|cuda]
                             [--out DIR] [--json] [--events FILE.jsonl]

Prints the recommendation and its reasons (or, with ``--json``, everything recommendation.json holds) and
writes recommendation.json and recommendation.png into the recommended file's run folder. The rule is in
``core.training.recommend``. Exit code 2 with one line on stderr for input that cannot be judged.
"""

from __future__ import annotations

import sys


def add_command(sub) -> None:
    p = sub.add_parser("recommend", help="recommend a checkpoint and a strength of a finished run, with reasons")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="a finished run's folder (several: compare a sweep)")
    p.add_argument("--clip", default=None, metavar="MODEL",
                   help="a CLIP model (local folder, or hub id already in the Hugging Face cache; 'auto': a known "
                        "one found in the cache) to score likeness, prompt adherence and leakage; without it "
                        "leakage is the pixel change")
    p.add_argument("--strengths", default="0.5,0.75,1", help="comma-separated strengths to compare (default "
                                                             "0.5,0.75,1; 'none': validation loss only)")
    p.add_argument("--prompt", "--prompts", dest="prompts", action="append", default=None, metavar="TEXT",
                   help="a prompt that uses the trigger (repeatable; default: the run's sample prompts)")
    p.add_argument("--leak-prompt", dest="leak_prompts", action="append", default=None, metavar="TEXT",
                   help="a prompt without the trigger, for leakage (repeatable; default: the run's sample "
                        "prompts without the trigger, else 'a photo of a dog', 'a landscape')")
    p.add_argument("--seed", type=int, default=0, help="seed of the first picture per prompt (default 0)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the run's sample.steps)")
    p.add_argument("--checkpoints", type=int, default=3,
                   help="rows of the grid: the best N files by validation loss, plus the final one (default 3)")
    p.add_argument("--images-per-prompt", type=int, default=1, help="pictures per prompt, seeds counting up")
    p.add_argument("--model", default=None, help="the base model, if it moved since training (default: the "
                                                 "run's model.path)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: the GPU when there is one)")
    p.add_argument("--out", default=None, metavar="DIR", help="where to write recommendation.json/.png (default: "
                                                              "the recommended file's run folder)")
    p.add_argument("--json", action="store_true", help="print the recommendation as JSON")
    p.add_argument("--events", default="", help="also write progress as JSON lines to this file")
    p.set_defaults(func=cmd_recommend)


def parse_strengths(text: str) -> list[float]:
    """"0.5,0.75,1" -> [0.5, 0.75, 1.0]; "none" or "" -> [] (ValueError names a bad item)."""
    if text.strip().lower() in ("", "none"):
        return []
    values = []
    for item in text.split(","):
        try:
            values.append(float(item))
        except ValueError:
            raise ValueError(f"--strengths: {item.strip()!r} is not a number; give e.g. 0.5,0.75,1") from None
    return values


def cmd_recommend(args) -> int:
    import json

    from core.base.models import ModelError
    from core.events import RunError, jsonl_writer
    from core.terminal import EXIT_BAD_INPUT, EXIT_FAILURE
    from core.terminal import fail as _fail
    from core.training.image_scores import ImageScoreError
    from core.training.recommend import recommend

    writer = jsonl_writer(args.events) if args.events else None

    def emit(event):
        if writer:
            writer(event)
        if event.type == "phase" and event.total:
            print(f"{event.name} {event.done}/{event.total}", file=sys.stderr, flush=True)

    def fail(message: str, code: int) -> int:
        if writer:
            writer(RunError(message, "error"))
        return _fail(message, code)

    try:
        rec = recommend(args.runs, parse_strengths(args.strengths), clip_model=args.clip, prompts=args.prompts,
                        seed=args.seed, steps=args.steps, device=args.device, emit=emit,
                        leak_prompts=args.leak_prompts,
                        checkpoints=args.checkpoints, images_per_prompt=args.images_per_prompt, model=args.model,
                        out_dir=args.out)
    except (ValueError, FileNotFoundError, ModelError, ImageScoreError) as exc:
        return fail(" ".join(str(exc).split()), EXIT_BAD_INPUT)
    except Exception as exc:  # noqa: BLE001 - one clear line for anything else
        return fail(f"recommending failed: {type(exc).__name__}: {' '.join(str(exc).split())}", EXIT_FAILURE)
    print(json.dumps(rec.to_dict(), indent=2, sort_keys=True) if args.json else rec.summary(), flush=True)
    return 0
