"""``python -m core runs``: training runs side by side, with the settings that differ between them.

    python -m core runs [OUTPUTS_DIR or RUN_DIR ...] [--json]

With no folder it reads ./outputs. An outputs folder stands for all its runs (newest first); a run folder
for itself. The table has each run's state, best validation loss and its step, time, steps/s, peak memory,
file size, the final file's check, then one column per setting that is not the same in all the runs.
"""

from __future__ import annotations


def add_command(sub) -> None:
    p = sub.add_parser("runs", help="compare training runs: results and the settings that differ between them")
    p.add_argument("paths", nargs="*", default=["outputs"], metavar="OUTPUTS_DIR or RUN_DIR",
                   help="an outputs folder (all its runs) or run folders (default: ./outputs)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON (one object per run)")
    p.set_defaults(func=cmd_runs)


def cmd_runs(args) -> int:
    import json

    from core.terminal import EXIT_BAD_INPUT
    from core.terminal import fail as _fail
    from core.training.runs_compare import find_runs, format_table, run_rows, table

    try:
        runs = find_runs(args.paths)
    except FileNotFoundError as exc:
        return _fail(str(exc), EXIT_BAD_INPUT)
    if not runs:
        return _fail(f"no runs in {', '.join(args.paths)}: give the folder that holds the runs (the app's "
                     f"outputs folder, or output.dir of a config) or run folders", EXIT_BAD_INPUT)
    rows = run_rows(runs)
    if args.json:
        print(json.dumps([row.to_json() for row in rows], indent=2, ensure_ascii=False))
    else:
        print(format_table(*table(rows)))
    return 0
