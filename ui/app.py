"""The Gradio app: Dataset, Train and Prompt tabs over the engine in ``core``."""

from __future__ import annotations

from core.sample import Previewer
from ui.runner import RunManager
from ui.settings import AppSettings


def build_app(settings: AppSettings | None = None, manager: RunManager | None = None,
              previewer: Previewer | None = None):
    """Build the whole UI; nothing runs at import time."""
    import gradio as gr

    from ui import dataset_tab, prompt_tab, train_tab

    settings = settings or AppSettings.from_env()
    settings.ensure()
    manager = manager or RunManager(settings.outputs_dir)
    previewer = previewer or Previewer()
    with gr.Blocks(title="LoRA Studio", analytics_enabled=False) as app:
        gr.Markdown("# LoRA Studio\nDrop pictures in, train a LoRA on your GPU, try it with prompts.")
        with gr.Tabs():
            with gr.Tab("Dataset", id="dataset", elem_id="tab-dataset"):
                dataset = dataset_tab.build(settings)
            with gr.Tab("Train", id="train", elem_id="tab-train"):
                train = train_tab.build(settings, manager)
            with gr.Tab("Prompt", id="prompt", elem_id="tab-prompt"):
                prompt = prompt_tab.build(settings, previewer)

        def on_load(name):
            return (*dataset["refresh"](name), *train["refresh"](), *prompt["refresh"](), *train["on_tick"]())

        def follow_dataset(name):
            """The Train tab trains the dataset picked in the Dataset tab."""
            from ui.widgets import dataset_choices

            choices = dataset_choices(settings)
            path = str(settings.datasets_dir / name) if name else None
            return gr.update(choices=choices, value=path) if path in choices else gr.update(choices=choices)

        dataset["picker"].change(follow_dataset, dataset["picker"], train["dataset"])
        # A reload re-reads every list and re-attaches to the run in progress.
        app.load(on_load, dataset["picker"],
                 [*dataset["listing"], train["runs"], train["model"], train["dataset"], *prompt["refresh_outputs"],
                  *train["tick_outputs"]])
    app.lora_studio = {"settings": settings, "manager": manager, "previewer": previewer}
    return app
