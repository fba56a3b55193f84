"""``python -m core``: the command line the app itself runs as a subprocess.

    python -m core tiny-model DIR [--family sd15|sd2|sdxl|sd3|flux|flux-schnell|flux2|zimage] [--shape tiny|sd15]
    python -m core train CONFIG.toml [--set section.key=value ...] [--resume]
    python -m core sample --model MODEL [--lora FILE] [--scale S] --prompt TEXT --seed N --steps K --out FILE.png
    python -m core caption DIR [--captioner blip|wd14|florence2] [--model PATH_OR_HUB_ID] [--prefix TRIGGER]
                               [--overwrite] [--threshold T] [--character-threshold T] [--exclude-tags TAGS]
                               [--task caption|detailed|more-detailed]
    python -m core tiny-captioner DIR [--kind blip|wd14|florence2]
    python -m core check-dataset DIR [--resolution R] [--model MODEL] [--trigger WORD] [--json]
    python -m core verify-lora FILE --model MODEL [--json] [--no-image] [--prompt TEXT] [--seed N] [--steps K]
    python -m core merge --model MODEL --lora FILE --scale S --out MERGED.safetensors [--precision fp16|bf16|fp32]
    python -m core class-pictures --model MODEL --prompt TEXT --count N --out DIR   (core/cli_class.py)
    python -m core queue|runs|recommend|demo-model ...   (core/cli_queue.py, cli_runs.py, cli_recommend.py, cli_demo.py)
    python -m core plan [CONFIG.toml] [--family sd1|sd2|sdxl|sd3|sd3-medium|flux|flux-schnell|flux2|zimage]
                        [--set section.key=value ...] [--vram GB] [--fit] [--json]

Errors end with exit code 2 (bad input) or 1 (failure during the run) and
one line on stderr that says what went wrong and what to do.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback

from core.base.tiny import TINY_FAMILIES
from core.terminal import EXIT_BAD_INPUT, EXIT_FAILURE, StopSignal, TerminalProgress, is_main_process
from core.terminal import fail as _fail


def main(argv: list[str] | None = None) -> int:
    _quiet_environment()
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:
        # The reader went away (`... | head`): not an error; keep Python from complaining at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _parser() -> argparse.ArgumentParser:
    from core.data.dataset import CAPTION_EXTENSION
    parser = argparse.ArgumentParser(prog="python -m core", description="Stable Diffusion LoRA training engine")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tiny-model", help="write a small random-weight model (for tests and demos)")
    p.add_argument("dir", help="folder to create")
    p.add_argument("--family", choices=list(TINY_FAMILIES), default="sd15",
                   help="SD 1.5, SD 2.x (v-prediction), SDXL, SD 3.5 (Medium's layout), FLUX.1-dev or FLUX.1-schnell "
                        "layout (default sd15)")
    p.add_argument("--shape", choices=["tiny", "sd15"], default="tiny",
                   help="tiny (fast, 64 px) or sd15 (the real SD-1.5 layer shapes, about 4 GB; sd15 family only)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_tiny_model)

    p = sub.add_parser("train", help="train a LoRA from a TOML config")
    p.add_argument("config", help="path to a config .toml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value, e.g. --set train.learning_rate=5e-5 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the run from its latest saved state")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar or step lines (warnings and results are still printed; events still go "
                        "to events.jsonl)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="generate one image with a base model and an optional LoRA")
    p.add_argument("--model", required=True, help="diffusers folder or hub id")
    p.add_argument("--lora", help="LoRA .safetensors file")
    p.add_argument("--scale", type=float, default=1.0, help="LoRA strength (default 1.0)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--sampler", default="default", help="default, ddim, euler, euler_a or dpmpp_2m")
    p.add_argument("--out", required=True, help="output .png")
    p.set_defaults(func=cmd_sample)

    _add_caption_command(sub)

    p = sub.add_parser("tiny-captioner", help="write a small random-weight captioner (for tests and demos)")
    p.add_argument("dir", help="folder to create")
    p.add_argument("--kind", choices=["blip", "wd14", "florence2"], default="blip",
                   help="which captioner to imitate (default: blip)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_tiny_captioner)

    p = sub.add_parser("verify-lora", help="check that a LoRA file maps onto its base model and changes its images")
    p.add_argument("file", help="the LoRA .safetensors (kohya or diffusers layout)")
    p.add_argument("--model", required=True, help="the base model (diffusers folder or hub id)")
    p.add_argument("--family", choices=["auto", "sd1", "sd2", "sdxl", "sd3", "flux", "flux2", "zimage"],
                   default="auto")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--no-image", action="store_true", help="skip generating images (names and shapes only)")
    p.add_argument("--prompt", default="a photo", help="prompt of the test images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=4, help="denoising steps of the test images (default 4)")
    p.add_argument("--size", type=int, default=0, help="test image side in pixels (default: the model's own)")
    p.set_defaults(func=cmd_verify_lora)

    p = sub.add_parser("merge", help="fuse a LoRA into its base model and save one single-file checkpoint")
    p.add_argument("--model", required=True, help="the base model (single file, diffusers folder or hub id)")
    p.add_argument("--lora", required=True, help="the LoRA .safetensors")
    p.add_argument("--scale", type=float, default=1.0, help="LoRA strength to fuse in (default 1.0)")
    p.add_argument("--out", required=True, help="the merged .safetensors to write")
    p.add_argument("--precision", choices=["fp16", "bf16", "fp32"], default="fp16")
    p.set_defaults(func=cmd_merge)

    _add_check_dataset_command(sub, CAPTION_EXTENSION)

    p = sub.add_parser("plan", help="estimate a run's peak GPU memory; with --fit, pick settings that fit the card")
    p.add_argument("config", nargs="?", default="", help="a config .toml (default: the default settings)")
    p.add_argument("--family", choices=["sd1", "sd2", "sdxl", "sd3", "sd3-medium", "flux", "flux-schnell", "flux2",
                                        "flux2-9b", "zimage"], default="",
                   help="plan for this family's reference model (no model needed): SD 1.5, SD 2.1, SDXL, SD 3.5 "
                        "Large or Medium, FLUX.1-dev or schnell, FLUX.2 [klein] 4B, Z-Image; else "
                        "model.family/model.path")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable)")
    p.add_argument("--vram", type=float, default=0.0, help="the card's memory in GB (default: the GPU found)")
    p.add_argument("--fit", action="store_true",
                   help="choose the fastest settings predicted to fit, printed as --set lines")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=cmd_plan)
    # Commands with their own modules (cli_class, cli_queue, ...), each adding its parser.
    import importlib

    for module in ("core.cli_class", "core.cli_queue", "core.cli_runs", "core.cli_recommend", "core.cli_demo"):
        importlib.import_module(module).add_command(sub)
    return parser


def _add_check_dataset_command(sub, caption_extension: str) -> None:
    p = sub.add_parser("check-dataset", help="report unreadable, small, blurry, duplicate and badly captioned images")
    p.add_argument("dir", help="dataset folder (images with same-name .txt captions)")
    p.add_argument("--resolution", type=int, default=512, help="training resolution (default 512)")
    p.add_argument("--model", default="",
                   help="diffusers model folder: its CLIP tokenizer checks caption length (else not checked)")
    p.add_argument("--trigger", default="", help="warn about captions that lack this trigger word")
    p.add_argument("--caption-extension", default=caption_extension,
                   help="extension of the caption files (default .txt; the training config's "
                        "dataset.caption_extension)")
    p.add_argument("--max-token-length", type=int, default=75, choices=(75, 150, 225),
                   help="caption tokens that count (the training config's dataset.max_token_length; default 75)")
    p.add_argument("--json", action="store_true", help="print the report as JSON (version 1 layout)")
    p.set_defaults(func=cmd_check_dataset)


def _add_caption_command(sub) -> None:
    """``python -m core caption``: the options every captioner has, then each captioner's own."""
    from core.data.dataset import CAPTION_EXTENSION

    p = sub.add_parser("caption", help="write a .txt caption beside every image in a folder with a captioning model")
    p.add_argument("dir", help="folder of images (its subfolders too, as training reads them)")
    p.add_argument("--captioner", default="blip",
                   help="blip (a short sentence, the default), wd14 (booru tags) or florence2 (a detailed paragraph)")
    p.add_argument("--model", default="",
                   help="model folder or hub id (default: Salesforce/blip-image-captioning-base, "
                        "SmilingWolf/wd-swinv2-tagger-v3 or florence-community/Florence-2-base)")
    p.add_argument("--prefix", default="", help="trigger word put first in every caption: 'TRIGGER, caption'")
    p.add_argument("--overwrite", action="store_true", help="replace existing captions (default: keep them)")
    p.add_argument("--batch-size", type=int, default=4, help="images per model call (default 4)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: the GPU if there is one)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="longest caption in tokens, blip and florence2 (default 40 and 256)")
    p.add_argument("--events", help="append progress events to this .jsonl file (what the app polls)")
    p.add_argument("--caption-extension", default=CAPTION_EXTENSION,
                   help="extension of the caption files to write and to look for (default .txt; the training "
                        "config's dataset.caption_extension)")
    tagger = p.add_argument_group("wd14 tagger options")
    tagger.add_argument("--threshold", type=float, default=None,
                        help="keep general tags scoring above this (0-1, default 0.35; higher: fewer, surer tags)")
    tagger.add_argument("--character-threshold", type=float, default=None,
                        help="keep character tags scoring above this (0-1, default 0.85)")
    tagger.add_argument("--exclude-tags", default=None,
                        help="comma-separated tags never to write, e.g. 'simple background, solo'")
    tagger.add_argument("--include-rating", action="store_true", default=None,
                        help="put the rating tag (general, sensitive, ...) first; left out by default")
    florence = p.add_argument_group("florence2 options")
    florence.add_argument("--task", default=None,
                          help="caption (one sentence), detailed or more-detailed (a paragraph, the default)")
    p.set_defaults(func=cmd_caption)


# ================================================================ commands


def cmd_tiny_model(args) -> int:
    from core.base.tiny import write_tiny_model

    try:
        path = write_tiny_model(args.dir, shape=args.shape, seed=args.seed, family=args.family)
    except (FileExistsError, ValueError) as exc:
        return _fail(str(exc), EXIT_BAD_INPUT)
    print(f"wrote a random-weight {args.shape} {args.family} model to {path}")
    return 0


def cmd_train(args) -> int:
    import torch

    from core import config as config_mod
    from core.base.models import ModelError
    from core.config import ConfigError
    from core.data.dataset import DatasetError
    from core.events import RunError, jsonl_writer

    try:
        config = config_mod.resolve_paths(config_mod.load(args.config, args.overrides))
    except ConfigError as exc:
        return _fail(f"config: {exc}", EXIT_BAD_INPUT)
    from core.training.run_folder import RunPaths

    events_path = RunPaths.of(config).events
    writer = jsonl_writer(events_path)
    terminal = TerminalProgress(no_bar=args.no_progress)
    started = False  # events go to the run's file only once the run owns the folder

    def emit(event):
        nonlocal started
        started = started or event.type in ("phase", "run_started", "message")
        if started and is_main_process():
            writer(event)
        terminal(event)

    def report(message: str, kind: str, code: int) -> int:
        """The one error line, on the terminal and (best effort: the disk may be full) in events.jsonl."""
        if started and is_main_process():
            try:
                writer(RunError(message, kind))
            except OSError as exc:
                print(f"warning: could not record the error in {events_path} ({exc.strerror or exc})",
                      file=sys.stderr)
        terminal.close()
        return _fail(message, code)

    stop = StopSignal()
    from core.training.memory_advice import out_of_memory_advice
    from core.training.run_folder import trainer_lock
    from core.training.train import TrainingError, run

    lock = contextlib.ExitStack()  # held through the run and the final check: the app sees a live trainer
    try:
        lock.enter_context(trainer_lock(config.run_dir))
        run(config, emit, should_stop=stop, resume=args.resume, final_check=True)
    except ConfigError as exc:
        return report(f"config: {exc}", "config", EXIT_BAD_INPUT)
    except DatasetError as exc:
        return report(f"dataset: {exc}", "dataset", EXIT_BAD_INPUT)
    except ModelError as exc:
        return report(f"model: {exc}", "model", EXIT_BAD_INPUT)
    except TrainingError as exc:
        return report(str(exc), exc.kind, EXIT_FAILURE)
    except torch.OutOfMemoryError:
        return report(out_of_memory_advice(config), "out_of_memory", EXIT_FAILURE)
    except KeyboardInterrupt:
        return report("interrupted twice: stopped without saving", "error", 130)
    except Exception as exc:  # the engine's unexpected failures still end with one clear line
        if _disk_full(exc, config.run_dir):
            return report(f"the disk is full: {_one_line(exc)}. Free space on the drive that holds "
                          f"{config.output.dir}, then continue with --resume (from the last saved step)",
                          "disk_full", EXIT_FAILURE)
        return report(f"{type(exc).__name__}: {_one_line(exc)}{_keep_traceback(config.run_dir)}", "error",
                      EXIT_FAILURE)
    finally:
        lock.close()  # the run folder is free again; temporary files of a cut-short save are removed
    terminal.close()
    return 0


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:500]


def _disk_full(exc: BaseException, folder) -> bool:
    """A write failed because the disk is full (some writers, safetensors and torch.save, only say it in words)."""
    import errno
    import shutil

    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return True
    if "No space left" in str(exc) or "StorageFull" in str(exc):
        return True
    try:
        return shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        return False


def _keep_traceback(run_dir) -> str:
    """Write traceback.txt into the run folder (best effort) and say where it is."""
    from core.training.run_folder import RunPaths

    trace = RunPaths(run_dir).traceback
    if not run_dir.is_dir():
        return ""
    try:
        from core.fsutil import write_text

        write_text(trace, traceback.format_exc())
    except OSError:
        return " (the details could not be written to the run folder)"
    return f" (details in {trace})"


def cmd_sample(args) -> int:
    from core.base.models import ModelError
    from core.base.sample import generate, load_pipeline
    from core.fsutil import save_image
    from core.lora.preview import apply_lora

    if args.width % 8 or args.height % 8:
        return _fail(f"--width {args.width} / --height {args.height} must be multiples of 8", EXIT_BAD_INPUT)
    try:
        pipe = load_pipeline(args.model, sampler=args.sampler)
        if args.lora:
            apply_lora(pipe, args.lora, args.scale)
        image = generate(pipe, args.prompt, seed=args.seed, steps=args.steps, guidance_scale=args.guidance_scale,
                         width=args.width, height=args.height, negative_prompt=args.negative_prompt)
    except (ModelError, FileNotFoundError, ValueError) as exc:
        return _fail(str(exc), EXIT_BAD_INPUT)
    save_image(args.out, image)
    print(f"wrote {args.out}")
    return 0


def cmd_caption(args) -> int:
    from core.captioning.caption import CaptionError, caption_folder, terminal_line
    from core.events import RunError, jsonl_writer

    writer = jsonl_writer(args.events) if args.events else None

    def emit(event):
        if writer:
            writer(event)
        line = terminal_line(event)
        if line is not None:
            print(line, file=sys.stdout if event.type == "caption_finished" else sys.stderr, flush=True)

    def report(message: str, kind: str, code: int) -> int:
        message = " ".join(message.split())  # one line, whatever the library said
        if writer:
            writer(RunError(message, kind))
        return _fail(message, code)

    from core.data.dataset import is_caption_extension

    if not is_caption_extension(args.caption_extension):
        return _fail(f"--caption-extension {args.caption_extension!r}: use a dot and 1-15 letters or digits, "
                     f"e.g. .txt", EXIT_BAD_INPUT)
    # Only the options given on the command line: one that does not fit the captioner is an error.
    names = ("threshold", "character_threshold", "exclude_tags", "include_rating", "task")
    options = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    stop = StopSignal()  # SIGTERM/SIGINT: finish the current batch, then stop
    try:
        caption_folder(args.dir, captioner=args.captioner, model=args.model, prefix=args.prefix,
                       overwrite=args.overwrite, batch_size=args.batch_size, emit=emit, should_stop=stop,
                       device=args.device, max_new_tokens=args.max_new_tokens, options=options,
                       caption_extension=args.caption_extension)
    except CaptionError as exc:
        return report(str(exc), exc.kind, EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        return report("interrupted twice: stopped; the captions written so far are kept", "error", 130)
    except Exception as exc:  # unexpected failures still end with one clear line
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(exc, torch.OutOfMemoryError):
            return report("out of GPU memory: lower --batch-size (or use --device cpu)", "out_of_memory",
                          EXIT_FAILURE)
        return report(f"{type(exc).__name__}: {exc}", "error", EXIT_FAILURE)
    return 0


def cmd_tiny_captioner(args) -> int:
    from core.captioning.caption import CaptionError, write_tiny_captioner

    try:
        path = write_tiny_captioner(args.dir, kind=args.kind, seed=args.seed)
    except (FileExistsError, CaptionError) as exc:
        return _fail(str(exc), EXIT_BAD_INPUT)
    what = {"blip": "BLIP captioner", "wd14": "WD tagger", "florence2": "Florence-2 captioner"}[args.kind]
    print(f"wrote a random-weight {what} to {path} (its captions are gibberish); use it with "
          f"python -m core caption DIR --captioner {args.kind} --model {path}")
    return 0


def cmd_check_dataset(args) -> int:
    import json

    from core.data.dataset import DatasetError, is_caption_extension
    from core.data.health import check_dataset, format_report, model_tokenizer

    if args.resolution <= 0:
        return _fail(f"--resolution must be positive, got {args.resolution}", EXIT_BAD_INPUT)
    if not is_caption_extension(args.caption_extension):
        return _fail(f"--caption-extension {args.caption_extension!r}: use a dot and 1-15 letters or digits, "
                     f"e.g. .txt", EXIT_BAD_INPUT)
    try:
        tokenizer = model_tokenizer(args.model) if args.model else None
        report = check_dataset(args.dir, resolution=args.resolution, tokenizer=tokenizer, trigger=args.trigger,
                               caption_extension=args.caption_extension, max_tokens=args.max_token_length)
    except DatasetError as exc:
        return _fail(str(exc), EXIT_BAD_INPUT)
    print(json.dumps(report.to_json(), indent=2, ensure_ascii=False) if args.json else format_report(report))
    return 0


def cmd_plan(args) -> int:
    import json

    from core import config as config_mod
    from core.base.architecture import of_model
    from core.base.checkpoints import CheckpointError
    from core.base.families import FamilyError
    from core.training import plan as planner

    try:
        if args.config:
            config = config_mod.load(args.config, args.overrides, check_paths=False)
        else:
            raw: dict = {}
            for item in args.overrides:
                config_mod.apply_override(raw, item)
            config = config_mod.from_dict(raw, check_paths=False)
        if args.family:  # a family's reference model (or a variant of it), no model needed
            from core.base.architecture import VARIANTS, reference

            config.model.family = VARIANTS.get(args.family, args.family)
            arch = reference(args.family)
        else:
            arch = of_model(config.model.path, config.model.family)
    except (config_mod.ConfigError, FamilyError, CheckpointError) as exc:
        return _fail(str(exc), EXIT_BAD_INPUT)
    if args.vram < 0:
        return _fail(f"--vram must be the card's memory in GB, got {args.vram}", EXIT_BAD_INPUT)
    vram, card, bf16 = planner.detect_card()
    if args.vram:
        vram, card = int(args.vram * planner.GiB), f"{args.vram:g} GB given with --vram"
    if args.fit and vram is None:
        return _fail(f"--fit needs the card's memory: {card}; pass --vram GB", EXIT_BAD_INPUT)
    plan = planner.fit(config, arch, vram, card, bf16) if args.fit else planner.estimate(config, arch, vram, card)
    print(json.dumps(plan.to_json(), indent=2) if args.json else planner.format_plan(plan))
    return 0


def cmd_verify_lora(args) -> int:
    import json

    from core.base.models import ModelError
    from core.lora.lora_io import LoraFileError
    from core.lora.verify import verify

    try:
        result = verify(args.file, args.model, family=args.family, image=not args.no_image, prompt=args.prompt,
                        seed=args.seed, steps=args.steps, size=args.size)
    except FileNotFoundError as exc:
        return _fail(str(exc), EXIT_BAD_INPUT)
    except ModelError as exc:
        return _fail(f"model: {exc}", EXIT_BAD_INPUT)
    except LoraFileError as exc:
        return _fail(str(exc), EXIT_BAD_INPUT)
    print(json.dumps(result.to_json(), indent=2) if args.json else result.summary())
    return 0 if result.ok else 1


def cmd_merge(args) -> int:
    from core.base.models import ModelError
    from core.lora.merge import merge
    from core.lora.single_file import SingleFileError

    try:
        path = merge(args.model, args.lora, args.scale, args.out, args.precision)
    except FileNotFoundError as exc:
        return _fail(str(exc), EXIT_BAD_INPUT)
    except ModelError as exc:
        return _fail(f"model: {exc}", EXIT_BAD_INPUT)
    except (SingleFileError, ValueError) as exc:
        return _fail(str(exc), EXIT_BAD_INPUT)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB): {args.model} with {args.lora} at {args.scale:g}")
    return 0


# ================================================================= helpers


def _quiet_environment() -> None:
    """No telemetry, and no library chatter that buries the progress bar."""
    from core.privacy import no_telemetry
    from core.quiet import quiet_libraries

    no_telemetry()
    quiet_libraries()
