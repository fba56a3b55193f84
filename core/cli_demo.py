"""``python -m core demo-model`` and ``demo-concept``: the demo model that learns, and a concept for it.

    python -m core demo-model DIR [--steps N] [--seed S]
    python -m core demo-concept DIR [--count N] [--seed S] [--trigger WORD]

``demo-model`` trains the small SD-1.x model of ``core.base.demo_model`` on drawn shapes (about ten CPU minutes
at the default steps; examples/demo-model is its result). ``demo-concept`` draws the pictures of a concept
that model never saw (magenta squares called "zorp") with captions, to train a LoRA on.
"""

from __future__ import annotations

import sys


def add_command(sub) -> None:
    from core.base.demo_model import DEFAULT_STEPS  # no heavy imports at that module's top

    p = sub.add_parser("demo-model", help="train the small demo model on drawn shapes (about ten CPU minutes)")
    p.add_argument("dir", help="folder to create (must not exist or be empty)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                   help=f"UNet training steps (default {DEFAULT_STEPS}, what examples/demo-model was built "
                        f"with); fewer steps also shorten the VAE's training and draw fewer pictures")
    p.add_argument("--seed", type=int, default=0, help="seed of the pictures and the weights (default 0)")
    p.set_defaults(func=cmd_demo_model)

    p = sub.add_parser("demo-concept", help="draw a captioned dataset of a concept the demo model never saw")
    p.add_argument("dir", help="folder to write PNG pictures and .txt captions to (created)")
    p.add_argument("--count", type=int, default=8, help="how many pictures (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trigger", default="zorp", help="the concept's word in the captions (default zorp)")
    p.set_defaults(func=cmd_demo_concept)


def cmd_demo_model(args) -> int:
    import time

    from core.base.demo_model import write_demo_model
    from core.terminal import EXIT_BAD_INPUT
    from core.terminal import fail as _fail

    if args.steps < 1:
        return _fail(f"--steps must be at least 1 (got {args.steps})", EXIT_BAD_INPUT)
    started = time.monotonic()
    try:
        path = write_demo_model(args.dir, steps=args.steps, seed=args.seed,
                                log=lambda text: print(text, file=sys.stderr, flush=True))
    except (FileExistsError, ValueError) as exc:
        return _fail(str(exc), EXIT_BAD_INPUT)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    print(f"wrote the demo model to {path} ({size / 1e6:.1f} MB, {(time.monotonic() - started) / 60:.1f} min)")
    return 0


def cmd_demo_concept(args) -> int:
    from core.base.demo_pictures import write_concept_dataset
    from core.terminal import EXIT_BAD_INPUT
    from core.terminal import fail as _fail

    if args.count < 1 or not args.trigger.strip():
        return _fail("--count must be at least 1 and --trigger a word", EXIT_BAD_INPUT)
    folder = write_concept_dataset(args.dir, count=args.count, seed=args.seed, trigger=args.trigger.strip())
    print(f"wrote {args.count} pictures of '{args.trigger.strip()}' with captions to {folder}")
    return 0
