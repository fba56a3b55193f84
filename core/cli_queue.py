"""``python -m core queue``: runs that train one after another, and sweeps (see core/training/queue.py).

    python -m core queue add CONFIG.toml [--set section.key=value ...] [--sweep section.key=v1,v2,... [--sweep ...]]
    python -m core queue list [--outputs DIR] [--json]
    python -m core queue run [--outputs DIR]            work the queue here until nothing waits
    python -m core queue start [--outputs DIR]          the same, in the background (as the app does)
    python -m core queue pause [--outputs DIR]          start nothing new after the run in progress
    python -m core queue cancel ID [--outputs DIR]      a waiting entry is dropped; a running one stops and saves
    python -m core queue move ID up|down|top|bottom [--outputs DIR]
    python -m core queue clear [--outputs DIR]          forget the entries that ended (their runs stay)

The queue lives in the runs' folder (output.dir, default ``outputs``): ``OUTPUTS/.queue/``.
"""

from __future__ import annotations

import json
import sys


def add_command(sub) -> None:
    p = sub.add_parser("queue", help="queue runs (and sweeps of a setting) to train one after another")
    verbs = p.add_subparsers(dest="verb", required=True)

    def verb(name: str, help_text: str):
        one = verbs.add_parser(name, help=help_text)
        one.add_argument("--outputs", default="outputs", help="the runs' folder (output.dir; default outputs)")
        one.set_defaults(func=cmd_queue)
        return one

    add = verbs.add_parser("add", help="queue a run from a TOML config, or one run per value of a sweep")
    add.add_argument("config", help="the run's config (as for `python -m core train`)")
    add.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override one setting (repeatable)")
    add.add_argument("--sweep", action="append", default=[], metavar="SECTION.KEY=V1,V2,...",
                     help="one run per value; given twice, one run per pair of values (a grid)")
    add.add_argument("--start", action="store_true", help="start working the queue in the background too")
    add.set_defaults(func=cmd_queue)
    verb("list", "show the queue").add_argument("--json", action="store_true", help="print JSON")
    verb("run", "work the queue in this terminal until nothing waits (Ctrl+C: the run saves, then it ends)")
    verb("start", "work the queue in the background")
    verb("pause", "start nothing new once the run in progress ends")
    verb("cancel", "cancel a waiting entry, or stop a running one (it saves)").add_argument("id", type=int)
    move = verb("move", "reorder a waiting entry")
    move.add_argument("id", type=int)
    move.add_argument("where", choices=["up", "down", "top", "bottom"])
    verb("clear", "forget the entries that ended (their runs stay in the outputs folder)")


def cmd_queue(args) -> int:
    from core.config import ConfigError
    from core.terminal import EXIT_BAD_INPUT
    from core.terminal import fail as _fail

    try:
        return _VERBS[args.verb](args)
    except ConfigError as exc:
        return _fail(f"queue: {exc}", EXIT_BAD_INPUT)


def _queue(args):
    from core.training.queue import RunQueue

    return RunQueue(args.outputs)


def _add(args) -> int:
    from core import config as config_mod
    from core.training.queue import RunQueue, parse_sweep

    config = config_mod.resolve_paths(config_mod.load(args.config, args.overrides))
    queue = RunQueue(config.output.dir)
    added = queue.add(config, [parse_sweep(text) for text in args.sweep])
    for entry in added:
        print(f"queued {entry.label}")
    if args.start:
        print("the queue is working in the background" if queue.start_worker()
              else "a worker is already working the queue")
    elif queue.worker() is None:
        print(f"start it with: python -m core queue start --outputs {queue.outputs}")
    return 0


def _list(args) -> int:
    import dataclasses

    queue = _queue(args)
    entries = queue.entries()
    if args.json:
        print(json.dumps({"worker": bool(queue.worker()), "paused": queue.paused,
                          "entries": [dataclasses.asdict(e) for e in entries]}, indent=2))
        return 0
    if not entries:
        print(f"the queue in {queue.folder} is empty")
        return 0
    for entry in entries:
        print(f"{entry.state:<10} {entry.label}" + (f"  -- {entry.message}" if entry.message else ""))
    worker = queue.worker()
    print(f"worker: process {worker.pid}" if worker else "worker: none" + (" (paused)" if queue.paused else ""))
    return 0


def _run(args) -> int:
    from core.terminal import StopSignal

    stop = StopSignal()
    count = _queue(args).run(say=lambda line: print(line, flush=True), should_stop=stop)
    print(f"the queue trained {count} run(s)" + (" and was stopped" if stop() else ""), flush=True)
    return 0


def _start(args) -> int:
    print("the queue is working in the background" if _queue(args).start_worker()
          else "nothing to start: a worker is already working the queue, or nothing waits")
    return 0


def _pause(args) -> int:
    _queue(args).pause()
    print("the queue starts nothing new after the run in progress; `queue start` goes on")
    return 0


def _cancel(args) -> int:
    entry = _queue(args).cancel(args.id)
    print(f"{entry.label}: " + ("cancelled" if entry.state == "cancelled" else "stopping after its current step "
                                                                             "(it saves)"))
    return 0


def _move(args) -> int:
    _queue(args).move(args.id, args.where)
    return _list(type("Args", (), {"outputs": args.outputs, "json": False})())


def _clear(args) -> int:
    print(f"forgot {_queue(args).clear()} ended entr(ies); their runs stay in the outputs folder", file=sys.stdout)
    return 0


_VERBS = {"add": _add, "list": _list, "run": _run, "start": _start, "pause": _pause, "cancel": _cancel,
          "move": _move, "clear": _clear}
