"""Dataset tab: create or pick a dataset, drop pictures (and captions) in, edit captions, bulk tools.

(No `from __future__ import annotations` here: gradio reads the `gr.SelectData` annotation at run time.)
"""


import json
from pathlib import Path

from core import caption_edits as edits
from core import dataset_store as store
from core.manifest import load_manifest
from ui import health_panel
from ui.server import discard_uploads
from ui.settings import AppSettings

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
    lines = [f"Added {len(report.added)} image(s) and {len(report.captions)} caption file(s)."]
    for name, reason in report.rejected:
        lines.append(f"- not added: `{name}` — {reason}")
    return "\n".join(lines)


DEFAULT_CAPTIONER = "Salesforce/blip-image-captioning-large"
# (label, name) of the captioners the Auto-caption box offers, and the hub model each suggests.
CAPTIONER_KINDS = [("BLIP: a short sentence", "blip"), ("WD14 tags: booru style", "wd14"),
                   ("Florence-2: a detailed paragraph", "florence2")]
HUB_CAPTIONERS = {"blip": DEFAULT_CAPTIONER, "wd14": "SmilingWolf/wd-swinv2-tagger-v3",
                  "florence2": "florence-community/Florence-2-large"}
FLORENCE_TASKS = [("One sentence", "caption"), ("A few sentences", "detailed"), ("A paragraph", "more-detailed")]


def captioner_models(settings: AppSettings, kind: str = "blip") -> list[str]:
    """Model folders of that kind of captioner under models/ first (offline), then the usual hub id
    (downloaded on first use)."""
    folders = sorted(settings.models_dir.iterdir()) if settings.models_dir.is_dir() else []
    return [str(p) for p in folders if _captioner_kind(p) == kind] + [HUB_CAPTIONERS[kind]]


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
        return {"task": form.get("task") or "more-detailed"}
    return {}


def build(settings: AppSettings):
    import gradio as gr

    def folder_of(name: str | None) -> Path | None:
        if not name:
            return None
        try:
            return store.dataset_path(settings.datasets_dir, name)
        except store.DatasetStoreError:
            return None

    names = store.list_datasets(settings.datasets_dir)
    with gr.Row():
        picker = gr.Dropdown(names, value=names[0] if names else None, label="Dataset", elem_id="dataset-name",
                             allow_custom_value=True, scale=3)
        new_name = gr.Textbox(label="New dataset", placeholder="my-character", elem_id="dataset-new-name", scale=3)
        create = gr.Button("Create", elem_id="dataset-create", scale=1)
        sub = gr.Dropdown(subfolders(folder_of(names[0]) if names else None), value=TOP_LEVEL,
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
                save = gr.Button("Save caption", variant="primary", elem_id="dataset-save-caption")
                remove = gr.Button("Remove from dataset", variant="stop", elem_id="dataset-remove")
            with gr.Accordion("Auto-caption", open=False, elem_id="dataset-autocaption-box"):
                caption_kind = gr.Dropdown(CAPTIONER_KINDS, value="blip", label="Captioner",
                                           info="Sentences for photo models, tags for anime-style ones. "
                                                "Runs on the GPU when present.", elem_id="dataset-captioner")
                caption_model = gr.Dropdown(captioner_models(settings), value=captioner_models(settings)[0],
                                            allow_custom_value=True, label="Captioner model (folder or hub id)",
                                            elem_id="dataset-captioner-model")
                with gr.Group(visible=False) as tagger_box:
                    tag_threshold = gr.Slider(0.05, 1.0, value=0.35, step=0.01, label="Tag threshold",
                                              info="Keep tags scoring above this; higher gives fewer, surer tags.",
                                              elem_id="dataset-tag-threshold")
                    character_threshold = gr.Slider(0.05, 1.0, value=0.85, step=0.01,
                                                    label="Character tag threshold",
                                                    elem_id="dataset-character-threshold")
                    exclude_tags = gr.Textbox(label="Tags to leave out (comma-separated)",
                                              placeholder="simple background, solo", elem_id="dataset-exclude-tags")
                florence_task = gr.Dropdown(FLORENCE_TASKS, value="more-detailed", label="Caption length",
                                            visible=False, elem_id="dataset-florence-task")
                caption_prefix = gr.Textbox(label="Trigger word to put first", elem_id="dataset-caption-prefix")
                caption_overwrite = gr.Checkbox(False, label="Replace existing captions",
                                                elem_id="dataset-caption-overwrite")
                with gr.Row():
                    autocaption = gr.Button("Caption pictures", variant="primary", elem_id="dataset-autocaption")
                    stop_caption = gr.Button("Stop", elem_id="dataset-autocaption-stop")
                caption_progress = gr.Markdown(elem_id="dataset-caption-progress")
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
        health_panel.build(folder_of, picker)

    def view_of(name, folder_name=TOP_LEVEL) -> Path | None:
        return view_folder(folder_of(name), folder_name)

    def refresh(name, folder_name=TOP_LEVEL):
        root = folder_of(name)
        try:
            view = view_folder(root, folder_name)
        except store.DatasetStoreError:
            view = root
        return gallery_items(view, root), counts_text(view, root)

    def on_pick(name):
        return gr.update(choices=subfolders(folder_of(name)), value=TOP_LEVEL), *refresh(name)

    def on_folder(name, folder_name):
        try:
            view_of(name, folder_name)
        except store.DatasetStoreError as exc:
            return f"⚠️ {exc}", *refresh(name)
        return "", *refresh(name, folder_name)

    def on_create(name):
        try:
            folder = store.create_dataset(settings.datasets_dir, name or "")
        except store.DatasetStoreError as exc:
            return gr.skip(), f"⚠️ {exc}"
        return gr.update(choices=store.list_datasets(settings.datasets_dir), value=folder.name), \
            f"Created dataset `{folder.name}`. Drop pictures below."

    def on_upload(name, folder_name, files):
        try:
            folder = view_of(name, folder_name)
        except store.DatasetStoreError as exc:
            return None, f"⚠️ {exc}", gr.skip(), *refresh(name)
        if folder is None:
            return None, "⚠️ create or pick a dataset first", gr.skip(), *refresh(name)
        folder.mkdir(exist_ok=True)  # a new concept folder
        files = files or []
        paths = [getattr(f, "name", f) for f in files]
        try:
            report = store.import_files(folder, paths, [Path(p).name for p in paths])
        finally:
            discard_uploads(paths)  # the dataset holds its own copies now; Gradio's temp ones go
        return (None, import_message(report), gr.update(choices=subfolders(folder_of(name))),
                *refresh(name, folder_name))

    def on_select(name, folder_name, evt: gr.SelectData):
        folder = view_of(name, folder_name)
        images = store.list_images(folder) if folder and folder.is_dir() else []
        if evt.index is None or evt.index >= len(images):
            return "", ""
        image = images[evt.index]
        return image.name, image.caption

    def on_save(name, folder_name, image_name, text):
        folder = view_of(name, folder_name)
        try:
            if folder is None or not image_name:
                raise store.DatasetStoreError("pick a picture in the gallery first")
            edits.save_caption(folder, image_name, text or "")
        except store.DatasetStoreError as exc:
            return f"⚠️ {exc}", gr.skip()
        return f"Saved the caption of `{image_name}`.", counts_text(folder, folder_of(name))

    def on_remove(name, folder_name, image_name):
        folder = view_of(name, folder_name)
        try:
            if folder is None or not image_name:
                raise store.DatasetStoreError("pick a picture in the gallery first")
            moved = store.remove_image(folder, image_name)
        except store.DatasetStoreError as exc:
            return f"⚠️ {exc}", *refresh(name, folder_name), gr.skip(), gr.skip()
        return (f"Removed `{image_name}` (kept in `{moved.parent}`; nothing is deleted).",
                *refresh(name, folder_name), "", "")

    def bulk(action):
        def run(name, folder_name, *args):
            try:
                folder = view_of(name, folder_name)
                if folder is None:
                    raise store.DatasetStoreError("create or pick a dataset first")
                changed = action(folder, *args)
            except store.DatasetStoreError as exc:
                return f"⚠️ {exc}", *refresh(name, folder_name)
            return f"Changed {changed} caption(s) in this folder.", *refresh(name, folder_name)
        return run

    jobs: dict = {"caption": None}
    caption_timer = gr.Timer(1.0, active=False)

    caption_form = {"name": picker, "folder": sub, "kind": caption_kind, "model": caption_model,
                    "prefix": caption_prefix, "overwrite": caption_overwrite, "threshold": tag_threshold,
                    "character_threshold": character_threshold, "exclude_tags": exclude_tags, "task": florence_task}

    def on_captioner(kind):
        models = captioner_models(settings, kind)
        return (gr.update(choices=models, value=models[0]), gr.update(visible=kind == "wd14"),
                gr.update(visible=kind == "florence2"))

    def on_autocaption(values):
        from ui.runner import CaptionJob

        form = {key: values[component] for key, component in caption_form.items()}
        try:
            folder = view_of(form["name"], form["folder"])
        except store.DatasetStoreError as exc:
            return f"⚠️ {exc}", gr.skip()
        job = jobs["caption"]
        if folder is None or not folder.is_dir():
            return "⚠️ create or pick a dataset first", gr.skip()
        if job is not None and job.running:
            return "⚠️ a captioning job is already running; stop it or wait", gr.skip()
        if not form["model"]:
            return "⚠️ enter a captioner model folder or hub id", gr.skip()
        kind = form["kind"] or "blip"
        jobs["caption"] = CaptionJob(folder, form["model"], settings.outputs_dir / ".app", captioner=kind,
                                     prefix=form["prefix"] or "", overwrite=bool(form["overwrite"]),
                                     options=caption_options(kind, form))
        return "Loading the captioner…", gr.Timer(active=True)

    def on_caption_tick(name, folder_name=TOP_LEVEL):
        job = jobs["caption"]
        if job is None:
            return gr.skip(), gr.Timer(active=False), gr.skip(), gr.skip()
        status = job.poll()
        if job.running:
            return status.text(), gr.skip(), gr.skip(), gr.skip()
        return status.text(), gr.Timer(active=False), *refresh(name, folder_name)

    def on_stop_caption():
        job = jobs["caption"]
        if job is None or not job.running:
            return "No captioning job is running."
        job.stop()
        return "Stopping after the current batch…"

    listing = [gallery, counts]
    caption_kind.change(on_captioner, caption_kind, [caption_model, tagger_box, florence_task])
    autocaption.click(on_autocaption, set(caption_form.values()), [caption_progress, caption_timer])
    caption_timer.tick(on_caption_tick, [picker, sub], [caption_progress, caption_timer, *listing],
                       show_progress="hidden")
    stop_caption.click(on_stop_caption, outputs=caption_progress)
    picker.change(on_pick, picker, [sub, *listing])
    sub.change(on_folder, [picker, sub], [message, *listing])
    create.click(on_create, new_name, [picker, message])
    upload.upload(on_upload, [picker, sub, upload], [upload, message, sub, *listing])
    gallery.select(on_select, [picker, sub], [selected, caption])
    save.click(on_save, [picker, sub, selected, caption], [message, counts])
    remove.click(on_remove, [picker, sub, selected], [message, *listing, selected, caption])
    add_trigger.click(bulk(edits.add_trigger_word), [picker, sub, trigger], [message, *listing])
    do_replace.click(bulk(edits.find_replace), [picker, sub, find, replace], [message, *listing])
    prepend.click(bulk(lambda f, t: edits.add_text(f, t, "prepend")), [picker, sub, text], [message, *listing])
    append.click(bulk(lambda f, t: edits.add_text(f, t, "append")), [picker, sub, text], [message, *listing])
    return {"picker": picker, "refresh": refresh, "listing": listing, "caption_model": caption_model,
            "captioner": caption_kind}
