"""``python -m core class-pictures``: draw regularisation (class) pictures with the base model.

    python -m core class-pictures --model MODEL --prompt "a photo of a dog" --count 100 --out DIR
                                  [--negative TEXT] [--steps K] [--size PX] [--seed N] [--guidance G]
                                  [--device cpu|cuda] [--events FILE.jsonl]

Pictures already in DIR are kept (a stopped job continues); SIGTERM or Ctrl+C stops after the current
picture. Progress goes to stderr and, with ``--events``, as JSON lines the app polls.
"""

from __future__ import annotations

import sys


def add_command(sub) -> None:
    p = sub.add_parser("class-pictures", help="draw class pictures for dataset.regularization_path with the base "
                                              "model")
    p.add_argument("--model", required=True, help="the base model (folder, hub id or single file)")
    p.add_argument("--prompt", required=True, help="what the class looks like, e.g. 'a photo of a dog'")
    p.add_argument("--count", type=int, default=100, help="how many pictures (default 100)")
    p.add_argument("--out", required=True, help="the folder to write them to (created)")
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument("--steps", type=int, default=0, help="denoising steps (default: the model's own, else 25)")
    p.add_argument("--size", type=int, default=0, help="picture side in pixels (default: the model's native)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first picture; the next ones count up")
    p.add_argument("--guidance", type=float, default=0.0, help="guidance scale (default: the model's own, "
                                                               "else 7.5)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: the GPU when there is one)")
    p.add_argument("--events", default="", help="also write progress as JSON lines to this file")
    p.set_defaults(func=cmd_class_pictures)


def cmd_class_pictures(args) -> int:
    from core.base.models import ModelError
    from core.events import RunError, jsonl_writer
    from core.terminal import EXIT_BAD_INPUT, EXIT_FAILURE, StopSignal
    from core.terminal import fail as _fail
    from core.training.regularization import make_class_pictures

    writer = jsonl_writer(args.events) if args.events else None

    def emit(event):
        if writer:
            writer(event)
        if event.type == "phase" and event.total:
            print(f"{event.name} {event.done}/{event.total}", file=sys.stderr, flush=True)
        elif event.type == "message":
            print(f"{event.level}: {event.text}", file=sys.stderr, flush=True)

    def fail(message: str, code: int) -> int:
        if writer:
            writer(RunError(message, "error"))
        return _fail(message, code)

    stop = StopSignal()
    try:
        pictures = make_class_pictures(args.model, args.prompt, args.count, args.out, negative_prompt=args.negative,
                                       steps=args.steps, size=args.size, seed=args.seed,
                                       guidance_scale=args.guidance, device=args.device, emit=emit,
                                       should_stop=stop)
    except (ValueError, FileNotFoundError, ModelError) as exc:
        return fail(" ".join(str(exc).split()), EXIT_BAD_INPUT)
    except Exception as exc:  # noqa: BLE001 - one clear line for anything else
        return fail(f"drawing class pictures failed: {type(exc).__name__}: {' '.join(str(exc).split())}",
                    EXIT_FAILURE)
    print(f"{len(pictures)} class pictures in {args.out}; set dataset.regularization_path to it", flush=True)
    return 0
