"""The Dataset tab's health report: flagged pictures with their reasons, and one-click exclude / keep / undo.

Decisions go to the dataset's ``dataset.toml`` (``core.data.manifest``); no file is
ever moved or deleted. The report itself is computed once per "Check" click
and kept, so a decision only rewrites the small manifest and re-renders.
The per-folder repeats ("concepts") table lives here too: it edits the same
manifest.

(No `from __future__ import annotations` here: gradio reads the `gr.SelectData` annotation at run time.)
"""

import dataclasses
from pathlib import Path

from core.data import manifest as manifest_mod

DECISION_LABELS = {"exclude": "excluded", "keep": "kept", None: ""}


def check(folder: Path, resolution=512, model: str = "", trigger: str = ""):
    """The health report of ``folder`` (see ``check_for_run``)."""
    return check_for_run(folder, resolution, model, trigger)[0]


def check_for_run(folder: Path, resolution=512, model: str = "", trigger: str = "", max_tokens=75):
    """The report the run's settings call for, as ``python -m core check-dataset`` makes it: the Train tab's
    resolution, the picked model's tokenizer (caption length, against dataset.max_token_length), the run's
    trigger phrase. -> (report, a line saying what was checked and what could not be)."""
    from core.data.dataset import DatasetError
    from core.data.health import check_dataset, model_tokenizer

    resolution = int(resolution or 512)
    trigger = (trigger or "").strip()
    tokenizer, missing = None, "pick a base model in the Train tab to check caption length"
    if model:
        try:
            tokenizer, missing = model_tokenizer(model), ""
        except DatasetError as exc:
            missing = f"caption length not checked: {exc}"
    report = check_dataset(folder, resolution=resolution, tokenizer=tokenizer, trigger=trigger,
                           max_tokens=int(max_tokens or 75))
    done = [f"at the Train tab's resolution, {resolution} px"]
    if tokenizer is not None:
        done.append(f"caption length (up to {int(max_tokens or 75)} tokens) with the tokenizer of {Path(model).name}")
    done.append(f"trigger phrase {trigger!r}" if trigger else "no trigger phrase set (Train tab, Advanced)")
    return report, "Checked " + "; ".join(done) + (f". ({missing})" if missing else ".")


def with_decisions(report, folder: Path):
    """The report with every file's decision re-read from dataset.toml (after a click)."""
    from core.data.health import recount

    current = manifest_mod.load_manifest(folder)
    files = [dataclasses.replace(f, decision=current.decision(f.file)) for f in report.files]
    decided = dataclasses.replace(report, files=files)
    return dataclasses.replace(decided, summary=recount(decided))


def summary(report) -> str:
    """The report's headline numbers and groups, as Markdown."""
    s = report.summary
    lines = [f"**{s['usable']}** usable of {s['images']} pictures · **{s['errors']}** cannot be used · "
             f"**{s['warnings']}** with warnings · **{s['excluded']}** excluded, {s['kept']} kept on purpose · "
             f"{s['duplicate_groups']} exact and {s['near_duplicate_groups']} near-duplicate group(s)"]
    for group in report.duplicate_groups:
        lines.append(f"- same pixels: {', '.join(f'`{f}`' for f in group)}")
    for group in report.near_duplicate_groups:
        lines.append(f"- nearly the same: {', '.join(f'`{f}`' for f in group)}")
    if report.masks:
        shown = ", ".join(f"`{m['file']}` {m['masked']:.0%}" for m in report.masks[:10])
        more = f" and {len(report.masks) - 10} more" if len(report.masks) > 10 else ""
        lines.append(f"\n{len(report.masks)} picture(s) have a loss mask (share masked out; used with Masked "
                     f"loss): {shown}{more}")
    if report.tag_frequency:
        top = ", ".join(f"{tag} ({count})" for tag, count in report.tag_frequency[:10])
        what = "caption tags" if s.get("caption_style") == "tags" else "words in the captions"
        lines.append(f"\nMost common {what}: {top}")
    return "\n".join(lines)


def rows(report) -> list[list[str]]:
    """One row per listed file: file, status, decision, every problem with what to do."""
    return [[f.file, f.status, DECISION_LABELS[f.decision], "; ".join(c["message"] for c in f.checks)]
            for f in report.files]


def gallery(report, folder: Path) -> list[tuple[str, str]]:
    """Flagged pictures that can be shown (unreadable files are only in the table), labelled with the reason."""
    items = []
    for f in report.files:
        if f.status == "error":
            continue
        label = ", ".join(c["check"].replace("_", " ") for c in f.checks) or "ok"
        if f.decision:
            label = f"{DECISION_LABELS[f.decision]} · {label}"
        items.append((str(folder / f.file), f"{f.file} — {label}"))
    return items


def shown_files(report) -> list[str]:
    """The files in gallery order (a gallery click gives an index into this)."""
    return [f.file for f in report.files if f.status != "error"]


def details(report, file: str) -> str:
    finding = next((f for f in report.files if f.file == file), None)
    if finding is None:
        return ""
    decided = f" — **{DECISION_LABELS[finding.decision]}**" if finding.decision else ""
    problems = "\n".join(f"- {c['message']}" for c in finding.checks) or "- nothing flagged"
    return f"`{file}`{decided}\n{problems}"


def decide(folder: Path, file: str, decision: str | None, report) -> str:
    """Record a decision (None undoes it) and say what happened."""
    if not file:
        raise manifest_mod.ManifestError("pick a picture in the report first")
    finding = next((f for f in report.files if f.file == file), None)
    reason = ", ".join(c["check"] for c in finding.checks) if finding else ""
    manifest_mod.set_decision(folder, file, decision, reason)
    if decision == "exclude":
        return f"`{file}` is excluded from training (recorded in dataset.toml; the file stays where it is)."
    if decision == "keep":
        return f"`{file}` is kept: its warnings are marked as seen."
    return f"`{file}`: decision removed; it trains as usual."


def exclude_copies(folder: Path, report) -> str:
    """Exclude every picture after the first of each exact and near-duplicate group."""
    copies = [f for group in report.duplicate_groups + report.near_duplicate_groups for f in group[1:]]
    current = manifest_mod.load_manifest(folder)
    todo = [f for f in copies if current.decision(f) is None]
    for f in todo:
        current.images[manifest_mod.normalise(f)] = manifest_mod.Decision("exclude", "duplicate")
    manifest_mod.save_manifest(folder, current)
    return f"Excluded {len(todo)} duplicate picture(s); the first of each group stays in training."


# --------------------------------------------------------------------------
# concepts: subfolders with their own repeats


def concept_rows(folder: Path) -> list[list]:
    """[subfolder, pictures, repeats] for each subfolder that holds pictures."""
    from core.data.dataset import picture_files

    counts: dict[str, int] = {}
    for path in picture_files(folder):
        rel = path.relative_to(folder)
        if len(rel.parts) > 1:
            counts[rel.parent.as_posix()] = counts.get(rel.parent.as_posix(), 0) + 1
    current = manifest_mod.load_manifest(folder)
    return [[name, n, current.repeats_for(f"{name}/x")] for name, n in sorted(counts.items())]


def save_concepts(folder: Path, table) -> str:
    """Write the repeats column of the concepts table to dataset.toml."""
    values = table.values.tolist() if hasattr(table, "values") else list(table or [])
    changed = 0
    for row in values:
        if not row or not str(row[0]).strip():
            continue
        try:
            repeats = int(float(row[2]))
        except (TypeError, ValueError):
            raise manifest_mod.ManifestError(f"repeats of {row[0]!r} is {row[2]!r}; use a whole number") from None
        manifest_mod.set_repeats(folder, str(row[0]), repeats)
        changed += 1
    return f"Saved the repeats of {changed} folder(s) to dataset.toml."


def build(folder_of, picker):
    """The Health report accordion's contents; ``folder_of(name)`` maps the picked dataset to its folder.

    Returns the Check button, its handler ``on_check(name, resolution, model, trigger)`` and its outputs:
    the app wires them once the Train tab (whose settings the check follows) exists."""
    import gradio as gr

    state: dict = {"report": None, "folder": None}
    run_check = gr.Button("Check this dataset", elem_id="dataset-check")
    headline = gr.Markdown(elem_id="dataset-health")
    with gr.Row():
        with gr.Column(scale=3):
            flagged = gr.Gallery(label="Flagged pictures (click one to decide)", columns=8, height=300,
                                 allow_preview=False, elem_id="dataset-health-gallery")
        with gr.Column(scale=2):
            chosen = gr.Textbox(label="Picked", interactive=False, elem_id="dataset-health-picked")
            chosen_details = gr.Markdown(elem_id="dataset-health-details")
            with gr.Row():
                exclude = gr.Button("Exclude from training", variant="stop", elem_id="dataset-health-exclude")
                keep = gr.Button("Keep", elem_id="dataset-health-keep")
                undo = gr.Button("Undo", elem_id="dataset-health-undo")
            copies = gr.Button("Exclude all duplicate copies", elem_id="dataset-health-exclude-copies")
            note = gr.Markdown(elem_id="dataset-health-note")
    table = gr.Dataframe(headers=["file", "status", "decision", "problems"], interactive=False, wrap=True,
                         column_widths=["28%", "12%", "14%", "46%"], elem_id="dataset-health-table")
    with gr.Accordion("Folder repeats (concepts)", open=False, elem_id="dataset-concepts-box"):
        gr.Markdown("Each subfolder of the dataset is a concept; give it more repeats to train it more often "
                    "(saved in dataset.toml, folder names stay as they are).")
        concepts = gr.Dataframe(headers=["folder", "pictures", "repeats"], datatype=["str", "number", "number"],
                                interactive=True, elem_id="dataset-concepts")
        save_repeats = gr.Button("Save repeats", elem_id="dataset-concepts-save")

    def render(report, folder):
        return summary(report), gallery(report, folder), rows(report)

    def on_check(name, resolution=512, model="", trigger="", max_tokens=75):
        folder = folder_of(name)
        if folder is None:
            return "⚠️ create or pick a dataset first", gr.skip(), gr.skip(), gr.skip(), "", ""
        state["report"], checked = check_for_run(folder, resolution, model, trigger, max_tokens)
        state["folder"] = folder
        headline_text, *rest = render(state["report"], folder)
        return f"{headline_text}\n\n{checked}", *rest, concept_rows(folder), "", ""

    def pick(file):
        report = state["report"]
        return (file, details(report, file)) if report is not None else ("", "")

    def on_gallery(evt: gr.SelectData):
        files = shown_files(state["report"]) if state["report"] is not None else []
        return pick(files[evt.index]) if evt.index is not None and evt.index < len(files) else ("", "")

    def on_table(evt: gr.SelectData):
        report = state["report"]
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        return pick(report.files[row].file) if report is not None and row < len(report.files) else ("", "")

    def decision(value):
        def run(file):
            report, folder = state["report"], state["folder"]
            try:
                if report is None:
                    raise manifest_mod.ManifestError("check the dataset first")
                message = decide(folder, file, value, report)
            except manifest_mod.ManifestError as exc:
                return f"⚠️ {exc}", gr.skip(), gr.skip(), gr.skip(), gr.skip()
            state["report"] = with_decisions(report, folder)
            return message, *render(state["report"], folder), details(state["report"], file)
        return run

    def on_copies():
        report, folder = state["report"], state["folder"]
        if report is None:
            return "⚠️ check the dataset first", gr.skip(), gr.skip(), gr.skip()
        message = exclude_copies(folder, report)
        state["report"] = with_decisions(report, folder)
        return message, *render(state["report"], folder)

    def on_save_repeats(name, table_value):
        folder = folder_of(name)
        if folder is None:
            return "⚠️ create or pick a dataset first", gr.skip()
        try:
            message = save_concepts(folder, table_value)
        except manifest_mod.ManifestError as exc:
            return f"⚠️ {exc}", gr.skip()
        return message, concept_rows(folder)

    shown = [headline, flagged, table]
    flagged.select(on_gallery, None, [chosen, chosen_details])
    table.select(on_table, None, [chosen, chosen_details])
    decided = [button.click(decision(value), chosen, [note, *shown, chosen_details])
               for button, value in ((exclude, "exclude"), (keep, "keep"), (undo, None))]
    decided.append(copies.click(on_copies, None, [note, *shown]))
    save_repeats.click(on_save_repeats, [picker, concepts], [note, concepts])
    # "decided": the events after which the Dataset tab's own gallery and counts are shown again.
    return {"check": run_check, "on_check": on_check, "outputs": [*shown, concepts, chosen, chosen_details],
            "decided": decided}
