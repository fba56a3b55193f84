"""The Gradio app: Dataset, Train and Prompt tabs over the engine in ``core``."""

from __future__ import annotations

from core.lora.preview import Previewer
from ui.runner import RunManager
from ui.server import served_paths
from ui.settings import AppSettings


def build_app(settings: AppSettings | None = None, manager: RunManager | None = None,
              previewer: Previewer | None = None):
    """Build the whole UI; nothing runs at import time."""
    import gradio as gr

    from ui import dataset_tab, prompt_tab, runs_tab, train_tab

    settings = settings or AppSettings.from_env()
    settings.ensure()
    # Pictures in the datasets and runs are served where they are, not copied into Gradio's temp folder
    # (a gallery of a thousand pictures would otherwise leave a thousand copies there).
    gr.set_static_paths(served_paths(settings))
    manager = manager or RunManager(settings.outputs_dir)
    from ui.queue_panel import resume_on_start

    resume_on_start(settings)  # a queue the app (or the machine) left with runs waiting goes on
    previewer = previewer or Previewer()
    with gr.Blocks(title="LoRA Studio", analytics_enabled=False) as app:
        with gr.Row():
            gr.Markdown("# LoRA Studio\nDrop pictures in, train a LoRA on your GPU, try it with prompts.")
            demo = gr.Button("Set up the offline demo", elem_id="app-demo", size="sm", scale=0)
        demo_message = gr.Markdown(elem_id="app-demo-message")
        with gr.Tabs() as tabs:
            with gr.Tab("Dataset", id="dataset", elem_id="tab-dataset"):
                dataset = dataset_tab.build(settings)
            with gr.Tab("Train", id="train", elem_id="tab-train"):
                train = train_tab.build(settings, manager)
            with gr.Tab("Prompt", id="prompt", elem_id="tab-prompt"):
                prompt = prompt_tab.build(settings, previewer)
            with gr.Tab("Runs", id="runs", elem_id="tab-runs"):
                runs = runs_tab.build(settings)

        def follow_dataset(name):
            """The Train tab trains the dataset picked in the Dataset tab."""
            from ui.widgets import dataset_choices

            choices = dataset_choices(settings)
            path = str(settings.datasets_dir / name) if name else None
            return gr.update(choices=choices, value=path) if path in choices else gr.update(choices=choices)

        dataset["picker"].change(follow_dataset, dataset["picker"], train["dataset"])
        # The health report checks what the run will train: the Train tab's resolution, model and trigger.
        health, fields = dataset["health"], train["components"]
        # Class pictures are drawn with the model the run trains on.
        fields["model.path"].change(lambda model: model, fields["model.path"], dataset["class_pictures"]["model"])
        health["check"].click(health["on_check"], [dataset["picker"], fields["dataset.resolution"],
                                                   fields["model.path"], fields["output.trigger_phrase"],
                                                   fields["dataset.max_token_length"]],
                              health["outputs"])

        def on_demo():
            from ui.demo import demo_updates

            return (*demo_updates(settings), *prompt["lists"].fn())

        demo.click(on_demo, outputs=[demo_message, dataset["picker"], train["model"], dataset["captioner"],
                                     dataset["caption_model"], train["preset"], *prompt["lists"].outputs])
        def use_in_prompt(lora):
            """The run's final LoRA and the model it was trained on picked in the Prompt tab, brought to the
            front (the model from the run's own config: the form may show other settings by now)."""
            from pathlib import Path

            from core import config as config_mod
            from core.training.run_folder import RunPaths

            models, loras, grid = prompt_tab.lists(settings)
            try:
                model = config_mod.load(RunPaths(Path(lora).parent).config, check_paths=False).model.path
            except (OSError, ValueError):
                model = None
            return (gr.update(choices=models["choices"], value=model), gr.update(choices=loras["choices"], value=lora),
                    grid, gr.Tabs(selected="prompt"))

        train["use_lora"].click(use_in_prompt, train["final_lora"], [*prompt["lists"].outputs, tabs])
        recommended = runs["recommend"]

        def use_recommended(chosen):
            """The recommended LoRA, its strength and its run's base model picked in the Prompt tab."""
            return (*recommended["on_use"](chosen), gr.Tabs(selected="prompt") if chosen else gr.skip())

        recommended["use"].click(use_recommended, recommended["chosen"],
                                 [prompt["model"], prompt["lora"], prompt["scale"], recommended["progress"], tabs])
        # A page load re-reads what each tab lists (and the Train tab re-attaches to the run in progress).
        for refresh in (*dataset["on_load"], *train["on_load"], *prompt["on_load"], *runs["on_load"]):
            app.load(refresh.fn, refresh.inputs, refresh.outputs)
    app.lora_studio = {"settings": settings, "manager": manager, "previewer": previewer}
    return app
