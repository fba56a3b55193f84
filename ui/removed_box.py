"""The Dataset tab's "Removed pictures" box: what Remove moved into ``.removed/``, and Restore to bring it back."""

from __future__ import annotations

from core.data import dataset_store as store
from ui.settings import AppSettings


def removed_list(settings: AppSettings, name, sub):
    """The Restore picker's choices: the removed pictures of the folder in view (nothing picked)."""
    import gradio as gr

    from ui.dataset_tab import view_of

    try:
        folder = view_of(settings, name, sub)
        names = store.list_removed(folder) if folder is not None and folder.is_dir() else []
    except store.DatasetStoreError:
        names = []
    return gr.update(choices=names, value=None)


def on_restore(settings: AppSettings, name, sub, picked):
    """Move the picked removed picture (and its caption) back: (message, gallery, counts, removed list)."""
    from ui.dataset_tab import in_folder

    def restore(folder):
        if not picked:
            raise store.DatasetStoreError("pick a removed picture to restore first")
        back = store.restore_image(folder, picked)
        return f"Restored `{back.name}`."

    out = in_folder(settings, name, sub, restore)
    return out.message, out.gallery, out.counts, removed_list(settings, name, sub)


def picked_buttons(image_name):
    """Save caption and Remove: usable only with a picture picked."""
    import gradio as gr

    return gr.update(interactive=bool(image_name)), gr.update(interactive=bool(image_name))


def build(settings: AppSettings) -> dict:
    import gradio as gr

    with gr.Accordion("Removed pictures", open=False, elem_id="dataset-removed-box"):
        gr.Markdown("Remove moves a picture and its caption into the dataset's hidden `.removed` folder; nothing "
                    "is deleted. Pick one to bring it back.")
        removed = gr.Dropdown([], value=None, label="Removed picture", elem_id="dataset-removed")
        restore = gr.Button("Restore", elem_id="dataset-restore", size="sm")
    return {"removed": removed, "restore": restore}
