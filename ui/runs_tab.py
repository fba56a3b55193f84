"""Runs tab: training runs side by side (core.training.runs_compare): a table of how each went with the settings
that differ between them, their validation losses in one plot, and their samples at a shared prompt and seed."""

from __future__ import annotations

from pathlib import Path

from ui import recommend_box
from ui.settings import AppSettings
from ui.widgets import Refresh

ALL_PAIRS = "all"  # the prompt-and-seed choice that shows every pair the runs share
MIN_STEP_SPAN = 40  # the plot spans the page: whole-step ticks up to about 1600 px wide

# Curve colours in the order the runs are picked (a run's moving average takes the next one): the plot keeps
# the colours it is given with each new selection (see curve_colours).
PALETTE = ("#2563eb", "#f97316", "#16a34a", "#dc2626", "#9333ea", "#0891b2", "#ca8a04", "#db2777", "#4b5563",
           "#65a30d")


# ------------------------------------------------------------ handlers (plain functions; build() wires them)


def refresh_runs(settings: AppSettings, selected: list[str] | None):
    """The run list afresh (newest first, with how each stands); the picked runs that are still there stay.

    The picks are sent back only when one of them is gone: otherwise runs picked while the list was being
    read (just after pressing Refresh) would be undone by the answer."""
    import gradio as gr

    from ui.train_tab import run_choices

    choices = run_choices(settings.outputs_dir)
    paths = {path for _, path in choices}
    kept = [run for run in selected or [] if run in paths]
    return gr.update(choices=choices) if len(kept) == len(selected or []) else gr.update(choices=choices, value=kept)


def table_frame(run_dirs: list[str]):
    """The comparison table: the fixed columns, then a column per setting that differs between the runs."""
    import pandas as pd

    from core.training.runs_compare import run_rows, table

    rows = run_rows(run_dirs)
    headers, cells = table(rows)
    return pd.DataFrame(cells, columns=headers), rows


def curve_frame(run_dirs: list[str]):
    """The validation losses of the runs as the plot takes them (run, step, loss), and a colour per curve.

    As the Train tab's loss plot (ui.run_view.loss_frame): typed columns even with no point (else every value
    becomes its own label on the axes), and one empty point per curve first, so every curve has its legend and
    colour from the frame the plot is given."""
    import pandas as pd

    from core.training.runs_compare import validation_curves

    points = validation_curves(run_dirs)
    names = list(dict.fromkeys(point.run for point in points))
    rows = [{"run": name, "step": 0, "loss": float("nan")} for name in names]
    rows += [point._asdict() for point in points]
    frame = pd.DataFrame(rows, columns=["run", "step", "loss"])
    return frame.astype({"run": "string", "step": "int64", "loss": "float64"}), curve_colours(names)


def curve_colours(names: list[str]) -> dict[str, str]:
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}


def plot_colours(run_dirs: list[str] | None):
    """The plot's colours for the curves of these runs, sent after its points (``compare``).

    The plot draws its legend and colours from the curves it had when its colours last changed: new points
    alone keep the old curves' colours (those of none, on a page opened with no run picked). A change of
    colours redraws it with the points it holds by then, so they go second, in their own update."""
    import gradio as gr

    frame, colours = curve_frame([d for d in run_dirs or [] if Path(d).is_dir()])
    last = int(frame["step"].max()) if len(frame) else 0
    # The step axis from 0 to the longest run, and at least MIN_STEP_SPAN: the plot draws about one tick per
    # 40 px, so a shorter axis across the page's width would tick at half steps.
    return gr.update(color_map=colours, x_lim=[0, max(last, MIN_STEP_SPAN)])


def pair_label(prompt: str, seed: int) -> str:
    return f"{prompt} · seed {seed}"


def sample_gallery(run_dirs: list[str], pair: str | None = None):
    """The runs' samples side by side, captioned "RUN · step N" (and the prompt and seed when the gallery
    shows several): (gallery items, pair choices, note)."""
    from core.training.runs_compare import side_by_side_samples

    found = side_by_side_samples(run_dirs)
    labels = {pair_label(p, s): (p, s) for p, s in found.pairs}
    if pair and pair != ALL_PAIRS and pair in labels:
        found = side_by_side_samples(run_dirs, *labels[pair])
    several = len({(cell.prompt, cell.seed) for cell in found.cells}) > 1  # a row of pictures per prompt: say which
    items = [(cell.path, f"{cell.caption} · {pair_label(cell.prompt, cell.seed)}" if several else cell.caption)
             for cell in found.cells]
    return items, [("All shared prompts", ALL_PAIRS), *((label, label) for label in labels)], found.note


def compare(run_dirs: list[str] | None, pair: str | None = None):
    """Everything the tab shows for the picked runs: (table, plot points, gallery, pair choice, message); the
    plot's colours follow (``plot_colours``)."""
    import gradio as gr

    run_dirs = [d for d in run_dirs or [] if Path(d).is_dir()]
    table, rows = table_frame(run_dirs)
    curves, _ = curve_frame(run_dirs)
    items, pairs, note = sample_gallery(run_dirs, pair)
    kept = pair if pair in {value for _, value in pairs} else ALL_PAIRS
    notes = [f"{row.name}: {row.config_error} (its settings are not compared)" for row in rows if row.config_error]
    if len(run_dirs) == 1:
        notes.insert(0, "Pick two or more runs to see the settings that differ between them.")
    if note:
        notes.append(note)
    return (table, curves,
            gr.update(value=items, columns=max(1, min(len(run_dirs), 6))),
            gr.update(choices=pairs, value=kept), "\n\n".join(notes))


# ------------------------------------------------------------------ layout


def build(settings: AppSettings):
    """The Runs tab's components and events (called inside a gr.Blocks)."""
    import gradio as gr

    from ui.train_tab import run_choices

    with gr.Row():
        runs = gr.Dropdown(run_choices(settings.outputs_dir), value=[], multiselect=True, label="Runs to compare",
                           elem_id="runs-select", scale=5)
        refresh = gr.Button("Refresh", elem_id="runs-refresh", size="sm", scale=0)
    message = gr.Markdown(elem_id="runs-message")
    table = gr.Dataframe(interactive=False, wrap=True, label="Runs (and the settings that differ)",
                         elem_id="runs-table")
    curves, colours = curve_frame([])
    plot = gr.LinePlot(curves, x="step", y="loss", color="run", color_map=colours, title="Validation loss",
                       elem_id="runs-plot", height=300)
    pair = gr.Dropdown([("All shared prompts", ALL_PAIRS)], value=ALL_PAIRS, label="Samples at prompt and seed",
                       elem_id="runs-pair")
    samples = gr.Gallery(label="Samples side by side (each run's newest at the same prompt and seed)", columns=2,
                         height=360, elem_id="runs-samples")
    recommend = recommend_box.build(settings, runs)

    # Named functions: gradio's API names for the events (scripts and tests call them by these).
    def on_refresh(selected):
        return refresh_runs(settings, selected)

    def on_compare(selected, picked):
        return compare(selected, picked)

    def on_colours(selected):
        return plot_colours(selected)

    shown = [table, plot, samples, pair, message]
    refresh.click(on_refresh, runs, runs).then(on_compare, [runs, pair], shown).then(on_colours, runs, plot)
    runs.change(on_compare, [runs, pair], shown).then(on_colours, runs, plot)
    pair.input(on_compare, [runs, pair], shown)
    return {"runs": runs, "refresh": Refresh(on_refresh, [runs], [runs]), "recommend": recommend,
            "on_load": [Refresh(on_refresh, [runs], [runs]), *recommend["on_load"]]}
