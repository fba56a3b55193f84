"""Dataset tab: create or pick a dataset, drop pictures (and captions) in, edit captions, bulk tools.

(No `from __future__ import annotations` here: gradio reads the `gr.SelectData` annotation at run time.)
"""


import json
from functools import partial
from pathlib import Path
from typing import NamedTuple

from core.data import caption_edits as edits
from core.data import dataset_store as store
from core.data.manifest import load_manifest
from ui import health_panel, removed_box
from ui.server import discard_uploads
from ui.settings import AppSettings
from ui.widgets import Refresh

TOP_LEVEL = "(top level)"  # the dataset folder itself in the Folder dropdown; other entries are subfolders


def subfolders(root: Path | None) -> list[str]:
    """The Folder dropdown: the top level, then each visible subfolder (a concept)."""
    if root is None or not root.is_dir():
        return [TOP_LEVEL]
    return [TOP_LEVEL] + sorted((p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                                key=str.casefold)


def view_folder(root: Path | None, sub: str | None) -> Path | None:
    """The folder the gallery shows: the dataset itself or one subfolder (validated like a dataset name)."""
    if root is None:
        return None
    if not sub or sub == TOP_LEVEL:
        return root
    return root / store.validate_name(sub)


def _relative(view: Path, root: Path, name: str) -> str:
    return (view / name).relative_to(root).as_posix()


def counts_text(folder: Path | None, root: Path | None = None) -> str:
    if folder is None:
        return "No dataset picked."
    root = root or folder
    if not folder.is_dir():
        return f"Folder `{folder.relative_to(root)}` is new: drop pictures to create it."
    c = store.counts(folder)
    decided = load_manifest(root)
    excluded = sum(decided.is_excluded(_relative(folder, root, img.name)) for img in store.list_images(folder))
    left_out = f" · **{excluded}** excluded from training" if excluded else ""
    return (f"**{c['images']}** images · **{c['captioned']}** captioned · **{c['uncaptioned']}** without caption"
            f"{left_out} — folder: `{folder}`")


def gallery_items(folder: Path | None, root: Path | None = None) -> list[tuple[str, str]]:
    if folder is None or not folder.is_dir():
        return []
    root = root or folder
    decided = load_manifest(root)
    return [(str(img.path),
             f"{img.name} (excluded)" if decided.is_excluded(_relative(folder, root, img.name)) else img.name)
            for img in store.list_images(folder)]


def import_message(report) -> str:
    line = f"Added {len(report.added)} image(s) and {len(report.captions)} caption file(s)."
    if report.replaced:
        line += (f" Replaced {len(report.replaced)}: a different picture had that name (the old ones are under "
                 f"Removed pictures, to restore; their captions stay unless new ones came).")
    if report.unchanged:
        line += f" {len(report.unchanged)} were already in the dataset, unchanged."
    lines = [line]
    for name, reason in report.rejected:
        lines.append(f"- not added: `{name}` — {reason}")
    return "\n".join(lines)


# (label, name) of the captioners the Auto-caption box offers.
CAPTIONER_KINDS = [("BLIP: a short sentence", "blip"), ("WD14 tags: booru style", "wd14"),
                   ("Florence-2: a detailed paragraph", "florence2")]
FLORENCE_TASKS = [("One sentence", "caption"), ("A few sentences", "detailed"), ("A paragraph", "more-detailed")]


def captioner_models(settings: AppSettings, kind: str = "blip") -> list[str]:
    """Model folders of that kind of captioner under models/ first (offline), then the hub id the
    captioner suggests (downloaded on first use)."""
    from core.captioning.caption import captioner_class

    folders = sorted(settings.models_dir.iterdir()) if settings.models_dir.is_dir() else []
    return [str(p) for p in folders if _captioner_kind(p) == kind] + [captioner_class(kind).suggested_model]


def _captioner_kind(folder: Path) -> str | None:
    """blip, florence2 or wd14 for a captioner model folder, None for anything else."""
    if (folder / "model.onnx").is_file() and (folder / "selected_tags.csv").is_file():
        return "wd14"
    try:
        model_type = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return {"blip": "blip", "florence2": "florence2"}.get(model_type)


def caption_options(kind: str, form: dict) -> dict:
    """The captioner's own options from the Auto-caption box (what CaptionJob passes to the command)."""
    if kind == "wd14":
        return {"threshold": form["threshold"], "character_threshold": form["character_threshold"],
                "exclude_tags": (form.get("exclude_tags") or "").strip() or None}
    if kind == "florence2":
        return {"task": form.get("task") or _defaults("florence2")["task"]}
    return {}


def _defaults(kind: str) -> dict:
    """The captioner's own option defaults (core's, so the app and the command line agree)."""
    from core.captioning.caption import captioner_class

    return captioner_class(kind).options


# ------------------------------------------------------------ handlers (plain functions; build() wires them)


def folder_of(settings: AppSettings, name: str | None) -> Path | None:
    """The dataset folder of a name from the picker, or None (no name, or no such dataset)."""
    if not name:
        return None
    try:
        return store.dataset_path(settings.datasets_dir, name)
    except store.DatasetStoreError:
        return None


def view_of(settings: AppSettings, name: str | None, sub: str | None = TOP_LEVEL) -> Path | None:
    """The folder the tab works on: the dataset or one of its concept subfolders (DatasetStoreError if bad)."""
    return view_folder(folder_of(settings, name), sub)


def dataset_names(settings: AppSettings, name: str | None = None):
    """The picker's choices read again (datasets made since the page was built), keeping its pick."""
    import gradio as gr

    names = store.list_datasets(settings.datasets_dir)
    return gr.update(choices=names, value=name if name in names else None)


def listing(settings: AppSettings, name: str | None, sub: str | None = TOP_LEVEL) -> tuple[list, str]:
    """(gallery items, counts line) of the folder in view; a bad folder name shows the dataset itself."""
    root = folder_of(settings, name)
    try:
        view = view_folder(root, sub)
    except store.DatasetStoreError:
        view = root
    return gallery_items(view, root), counts_text(view, root)


class Outcome(NamedTuple):
    """What an action on the folder in view leaves on screen."""

    message: str
    gallery: list
    counts: str
    ok: bool


def in_folder(settings: AppSettings, name, sub, action) -> Outcome:
    """Run ``action(folder) -> message`` on the folder in view, then list it again.

    The one place that turns a DatasetStoreError (no dataset picked, a bad name, a refused edit) into a
    message on screen.
    """
    try:
        folder = view_of(settings, name, sub)
        if folder is None:
            raise store.DatasetStoreError("create or pick a dataset first")
        message, ok = action(folder), True
    except store.DatasetStoreError as exc:
        message, ok = f"⚠️ {exc}", False
    return Outcome(message, *listing(settings, name, sub), ok)


def on_pick(settings: AppSettings, name):
    import gradio as gr

    return gr.update(choices=subfolders(folder_of(settings, name)), value=TOP_LEVEL), *listing(settings, name)


def on_folder(settings: AppSettings, name, sub):
    try:
        view_of(settings, name, sub)
    except store.DatasetStoreError as exc:
        return f"⚠️ {exc}", *listing(settings, name)
    return "", *listing(settings, name, sub)


def on_create(settings: AppSettings, name):
    import gradio as gr

    try:
        folder = store.create_dataset(settings.datasets_dir, name or "")
    except store.DatasetStoreError as exc:
        return gr.skip(), f"⚠️ {exc}"
    return (gr.update(choices=store.list_datasets(settings.datasets_dir), value=folder.name),
            f"Created dataset `{folder.name}`. Drop pictures below.")


def on_upload(settings: AppSettings, name, sub, files):
    """Copy dropped files into the folder in view (a new concept folder is made); Gradio's copies go."""
    import gradio as gr

    paths = [getattr(f, "name", f) for f in files or []]

    def add(folder: Path) -> str:
        folder.mkdir(exist_ok=True)  # a new concept folder
        try:
            return import_message(store.import_files(folder, paths, [Path(p).name for p in paths]))
        finally:
            discard_uploads(paths)  # the dataset holds its own copies now; Gradio's temp ones go

    out = in_folder(settings, name, sub, add)
    return None, out.message, gr.update(choices=subfolders(folder_of(settings, name))), out.gallery, out.counts


def selected_picture(settings: AppSettings, name, sub, index: int | None) -> tuple[str, str]:
    """(file name, caption) of the gallery's picture at ``index``; empty when there is none."""
    folder = view_of(settings, name, sub)
    images = store.list_images(folder) if folder and folder.is_dir() else []
    if index is None or index >= len(images):
        return "", ""
    return images[index].name, images[index].caption


def on_save(settings: AppSettings, name, sub, image_name, text):
    def save(folder: Path) -> str:
        if not image_name:
            raise store.DatasetStoreError("pick a picture in the gallery first")
        edits.save_caption(folder, image_name, text or "")
        return f"Saved the caption of `{image_name}`."

    out = in_folder(settings, name, sub, save)
    return out.message, out.counts


def on_remove(settings: AppSettings, name, sub, image_name):
    def remove(folder: Path) -> str:
        if not image_name:
            raise store.DatasetStoreError("pick a picture in the gallery first")
        moved = store.remove_image(folder, image_name)
        return f"Removed `{image_name}` (kept in `{moved.parent}`; nothing is deleted)."

    import gradio as gr

    out = in_folder(settings, name, sub, remove)
    cleared = ("", "") if out.ok else (gr.skip(), gr.skip())  # the picked picture and its caption
    return out.message, out.gallery, out.counts, *cleared


def bulk(settings: AppSettings, action, name, sub, *args):
    """A bulk caption tool on the folder in view: (message, gallery, counts)."""
    out = in_folder(settings, name, sub, lambda folder: f"Changed {action(folder, *args)} caption(s) in this folder.")
    return out.message, out.gallery, out.counts


def on_captioner(settings: AppSettings, kind):
    import gradio as gr

    models = captioner_models(settings, kind)
    return (gr.update(choices=models, value=models[0]), gr.update(visible=kind == "wd14"),
            gr.update(visible=kind == "florence2"))


class CaptionJobs:
    """The Auto-caption job of this app (one at a time), started and followed by the tab's handlers."""

    def __init__(self, settings: AppSettings):
        self.settings = settings
        self.job = None

    def start(self, form: dict):
        """``form``: the Auto-caption box's values by name (see CAPTION_FORM). -> (message, timer update)."""
        import gradio as gr

        from ui.runner import CaptionJob

        try:
            folder = view_of(self.settings, form["name"], form["folder"])
        except store.DatasetStoreError as exc:
            return f"⚠️ {exc}", gr.skip()
        if folder is None or not folder.is_dir():
            return "⚠️ create or pick a dataset first", gr.skip()
        if self.job is not None and self.job.running:
            return "⚠️ a captioning job is already running; stop it or wait", gr.skip()
        if not form["model"]:
            return "⚠️ enter a captioner model folder or hub id", gr.skip()
        kind = form["kind"] or "blip"
        self.job = CaptionJob(folder, self.settings.resolve(form["model"]), self.settings.outputs_dir / ".app",
                              captioner=kind,
                              prefix=form["prefix"] or "", overwrite=bool(form["overwrite"]),
                              options=caption_options(kind, form))
        return "Loading the captioner…", gr.Timer(active=True)

    def tick(self, name, sub=TOP_LEVEL):
        """-> (progress text, timer update, gallery, counts); the listing refreshes when the job ends."""
        import gradio as gr

        if self.job is None:
            return gr.skip(), gr.Timer(active=False), gr.skip(), gr.skip()
        status = self.job.poll()
        if self.job.running:
            return status.text(), gr.skip(), gr.skip(), gr.skip()
        return status.text(), gr.Timer(active=False), *listing(self.settings, name, sub)

    def stop(self) -> str:
        if self.job is None or not self.job.running:
            return "No captioning job is running."
        self.job.stop()
        return "Stopping after the current batch…"


# Names of the Auto-caption box's inputs, as CaptionJobs.start reads them.
CAPTION_FORM = ("name", "folder", "kind", "model", "prefix", "overwrite", "threshold", "character_threshold",
                "exclude_tags", "task")


# ------------------------------------------------------------------ layout


def handler(fn, *first, name: str | None = None):
    """``fn`` with its first arguments given, for gradio: it keeps a name (gradio's API name for the event,
    which tests and scripts call it by) and shows gradio only the remaining arguments."""

    def call(*args):
        return fn(*first, *args)

    call.__name__ = call.__qualname__ = name or fn.__name__
    call.__doc__ = fn.__doc__
    return call


def autocaption_box(settings: AppSettings) -> dict:
    """The Auto-caption accordion's components by name (CAPTION_FORM's, the buttons, the progress line)."""
    import gradio as gr

    tagger = _defaults("wd14")
    with gr.Accordion("Auto-caption", open=False, elem_id="dataset-autocaption-box"):
        caption_kind = gr.Dropdown(CAPTIONER_KINDS, value="blip", label="Captioner",
                                   info="Sentences for photo models, tags for anime-style ones. "
                                        "Runs on the GPU when present.", elem_id="dataset-captioner")
        caption_model = gr.Dropdown(captioner_models(settings), value=captioner_models(settings)[0],
                                    allow_custom_value=True, label="Captioner model (folder or hub id)",
                                    elem_id="dataset-captioner-model")
        with gr.Group(visible=False) as tagger_box:
            tag_threshold = gr.Slider(0.05, 1.0, value=tagger["threshold"], step=0.01, label="Tag threshold",
                                      info="Keep tags scoring above this; higher gives fewer, surer tags.",
                                      elem_id="dataset-tag-threshold")
            character_threshold = gr.Slider(0.05, 1.0, value=tagger["character_threshold"], step=0.01,
                                            label="Character tag threshold",
                                            elem_id="dataset-character-threshold")
            exclude_tags = gr.Textbox(label="Tags to leave out (comma-separated)",
                                      placeholder="simple background, solo", elem_id="dataset-exclude-tags")
        florence_task = gr.Dropdown(FLORENCE_TASKS, value=_defaults("florence2")["task"],
                                    label="Caption length", visible=False, elem_id="dataset-florence-task")
        caption_prefix = gr.Textbox(label="Trigger word to put first", elem_id="dataset-caption-prefix")
        caption_overwrite = gr.Checkbox(False, label="Replace existing captions",
                                        elem_id="dataset-caption-overwrite")
        with gr.Row():
            autocaption = gr.Button("Caption pictures", variant="primary", elem_id="dataset-autocaption")
            stop_caption = gr.Button("Stop", elem_id="dataset-autocaption-stop")
        caption_progress = gr.Markdown(elem_id="dataset-caption-progress")
    return {"kind": caption_kind, "model": caption_model, "prefix": caption_prefix, "overwrite": caption_overwrite,
            "threshold": tag_threshold, "character_threshold": character_threshold, "exclude_tags": exclude_tags,
            "task": florence_task, "tagger_box": tagger_box, "start": autocaption, "stop": stop_caption,
            "progress": caption_progress}


def build(settings: AppSettings):
    """The Dataset tab's layout and wiring (called inside a gr.Blocks); the handlers are the functions above."""
    import gradio as gr

    names = store.list_datasets(settings.datasets_dir)
    with gr.Row():
        # Nothing picked at first: never a silent guess at which dataset a new page means.
        picker = gr.Dropdown(names, value=None, label="Dataset", elem_id="dataset-name",
                             allow_custom_value=True, scale=3)
        new_name = gr.Textbox(label="New dataset", placeholder="my-character", elem_id="dataset-new-name", scale=3)
        create = gr.Button("Create", elem_id="dataset-create", scale=1)
        sub = gr.Dropdown(subfolders(None), value=TOP_LEVEL,
                          allow_custom_value=True, label="Folder (concept)", scale=3, elem_id="dataset-folder",
                          info="Pictures in a subfolder train with its own repeats (Health report → Folder "
                               "repeats). Type a new name to start one.")
    counts = gr.Markdown(elem_id="dataset-counts")
    upload = gr.File(file_count="multiple", label="Drop pictures here (and their .txt captions)",
                     elem_id="dataset-upload")
    message = gr.Markdown(elem_id="dataset-message")
    with gr.Row():
        with gr.Column(scale=3):
            gallery = gr.Gallery(label="Pictures (click one to edit its caption)", columns=6, height=420,
                                 allow_preview=False, elem_id="dataset-gallery")
        with gr.Column(scale=2):
            selected = gr.Textbox(label="Selected picture", interactive=False, elem_id="dataset-selected")
            caption = gr.Textbox(label="Caption", lines=4, elem_id="dataset-caption")
            with gr.Row():
                # Usable once a picture is picked in the gallery.
                save = gr.Button("Save caption", variant="primary", elem_id="dataset-save-caption",
                                 interactive=False)
                remove = gr.Button("Remove from dataset", variant="stop", elem_id="dataset-remove",
                                   interactive=False)
            trash = removed_box.build(settings)
            box = autocaption_box(settings)
            with gr.Accordion("Bulk tools", open=False):
                trigger = gr.Textbox(label="Trigger word (put first in every caption)", elem_id="dataset-trigger")
                add_trigger = gr.Button("Add trigger word", elem_id="dataset-add-trigger")
                find = gr.Textbox(label="Find", elem_id="dataset-find")
                replace = gr.Textbox(label="Replace with", elem_id="dataset-replace")
                do_replace = gr.Button("Replace in all captions", elem_id="dataset-do-replace")
                text = gr.Textbox(label="Text to add", elem_id="dataset-add-text")
                with gr.Row():
                    prepend = gr.Button("Prepend", elem_id="dataset-prepend")
                    append = gr.Button("Append", elem_id="dataset-append")
    with gr.Accordion("Health report", open=False, elem_id="dataset-health-box"):
        health = health_panel.build(partial(folder_of, settings), picker)
    from ui import class_pictures

    classes = class_pictures.build(settings, picker)

    jobs = CaptionJobs(settings)
    caption_timer = gr.Timer(1.0, active=False)
    caption_form = {"name": picker, "folder": sub, **{key: box[key] for key in CAPTION_FORM[2:]}}

    def on_select(name, folder_name, evt: gr.SelectData):  # gradio reads this annotation: defined here
        image_name, text = selected_picture(settings, name, folder_name, evt.index)
        return image_name, text, *removed_box.picked_buttons(image_name)

    def on_unpick():
        return "", "", *removed_box.picked_buttons("")

    def on_autocaption(values):
        return jobs.start({key: values[component] for key, component in caption_form.items()})

    def tool(action):
        return handler(bulk, settings, action, name="run")

    shown = [gallery, counts]
    box["kind"].change(handler(on_captioner, settings), box["kind"], [box["model"], box["tagger_box"], box["task"]])
    box["start"].click(on_autocaption, set(caption_form.values()), [box["progress"], caption_timer])
    caption_timer.tick(handler(jobs.tick, name="on_caption_tick"), [picker, sub],
                       [box["progress"], caption_timer, *shown], show_progress="hidden")
    box["stop"].click(handler(jobs.stop, name="on_stop_caption"), outputs=box["progress"])
    picker.change(handler(on_pick, settings), picker, [sub, *shown])
    sub.change(handler(on_folder, settings), [picker, sub], [message, *shown])
    create.click(handler(on_create, settings), new_name, [picker, message])
    upload.upload(handler(on_upload, settings), [picker, sub, upload], [upload, message, sub, *shown])
    for event in health["decided"]:  # an Exclude or Keep shows in the gallery's labels and counts at once
        event.then(handler(listing, settings, name="on_decided"), [picker, sub], shown)
    picked = [selected, caption, save, remove]
    gallery.select(on_select, [picker, sub], picked)
    for changed in (picker, sub):  # another dataset or folder in view: nothing picked
        changed.change(on_unpick, outputs=picked)
        changed.change(handler(removed_box.removed_list, settings, name="on_removed_list"), [picker, sub],
                       trash["removed"])
    save.click(handler(on_save, settings), [picker, sub, selected, caption], [message, counts])
    remove.click(handler(on_remove, settings), [picker, sub, selected], [message, *shown, selected, caption]).then(
        handler(removed_box.removed_list, settings, name="on_removed_list"), [picker, sub], trash["removed"]).then(
        removed_box.picked_buttons, selected, [save, remove])
    trash["restore"].click(handler(removed_box.on_restore, settings), [picker, sub, trash["removed"]],
                           [message, *shown, trash["removed"]])
    add_trigger.click(tool(edits.add_trigger_word), [picker, sub, trigger], [message, *shown])
    do_replace.click(tool(edits.find_replace), [picker, sub, find, replace], [message, *shown])
    prepend.click(tool(lambda f, t: edits.add_text(f, t, "prepend")), [picker, sub, text], [message, *shown])
    append.click(tool(lambda f, t: edits.add_text(f, t, "append")), [picker, sub, text], [message, *shown])
    return {"picker": picker, "caption_model": box["model"], "captioner": box["kind"], "health": health,
            "class_pictures": classes,
            "on_load": [Refresh(handler(dataset_names, settings, name="on_load_names"), [picker], [picker]),
                        Refresh(handler(listing, settings, name="on_load_dataset"), [picker], shown)]}
