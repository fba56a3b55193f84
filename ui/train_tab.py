"""Train tab: settings built from the config's own metadata, start/stop, live progress."""

from __future__ import annotations

import math
import typing
from pathlib import Path
from typing import Any

from core import config as config_mod
from core.config import ConfigError, TrainConfig
from ui import memory_panel, queue_panel
from ui import presets as presets_mod
from ui.run_view import (  # noqa: F401 - the live view of a run (read from here too)
    SERIES_COLOURS,
    check_html,
    error_box,
    error_text,
    final_file,
    final_file_text,
    loss_frame,
    loss_plot,
    progress_html,
    run_files_text,
    run_view,
    sample_gallery,
    status_text,
)
from ui.runner import RunBusyError, RunManager, list_runs, summarize
from ui.settings import AppSettings, model_choices
from ui.train_fields import (  # noqa: F401 - which settings the tab shows where (read from here too)
    HIDDEN,
    advanced_fields,
    advanced_groups,
    advanced_widgets,
    all_fields,
    basic_fields,
    field_info,
    group_id,
    topic_of,
)
from ui.unchanged import SentBefore
from ui.widgets import Refresh, form_updates

# ------------------------------------------------------------ form <-> config


def config_to_form(cfg: TrainConfig) -> dict[str, Any]:
    raw = config_mod.to_raw(cfg)
    values = {}
    for key in all_fields():
        section, name = key.split(".")
        value = raw[section][name]
        values[key] = "\n".join(value) if isinstance(value, list) else value
    return values


def form_to_config(values: dict[str, Any], settings: AppSettings, check_paths: bool = True) -> TrainConfig:
    """Widget values (keyed "section.key") to a validated config; list fields are one item per line."""
    raw: dict[str, dict] = {"output": {"dir": str(settings.outputs_dir)}}
    for key, value in values.items():
        section, name = key.split(".")
        hint = field_info(key)["type"]
        if typing.get_origin(hint) is list:
            value = [line.strip() for line in str(value or "").splitlines() if line.strip()]
        elif hint is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        elif hint is int and value is None:
            raise ConfigError(f"{key} is empty; enter a whole number")
        elif hint is str and value is None:
            value = ""
        if key in ("model.path", "model.vae_path", "dataset.path", "dataset.validation_path",
                   "dataset.regularization_path") and value:
            value = settings.resolve(value)  # relative to the app's home, wherever the app was started
        raw.setdefault(section, {})[name] = value
    return config_mod.from_dict(raw, check_paths=check_paths)


def steps_readout(values: dict[str, Any]) -> str:
    """The "steps = images x repeats x epochs / batch" line, from the dataset folder and the settings.

    The pictures are counted as training counts them (core.data.dataset.planned_pictures: subfolders, their
    folder repeats, exclusions), without decoding; the validation pictures are held out of the count.
    """
    from core.data.dataset import CAPTION_EXTENSION, DatasetError, planned_pictures

    folder = Path(str(values.get("dataset.path") or ""))
    if not folder.is_dir():
        return "Pick a dataset to see how many steps an epoch takes."
    try:
        planned = planned_pictures(folder, str(values.get("dataset.caption_extension") or CAPTION_EXTENSION))
    except DatasetError as exc:
        return f"⚠️ {exc}"
    images = len(planned)
    val_split = float(values.get("dataset.validation_split") or 0)
    held_out = 0 if images < 2 or val_split <= 0 else min(images - 1, max(1, round(images * val_split)))
    train_images = images - held_out
    # Held-out pictures are taken as single draws: the split prefers pictures that are not near-duplicates.
    draws = sum(n for _, n in planned) - held_out
    counted = f"{train_images} images" + (f" ({draws} with folder repeats)" if draws != train_images else "")
    repeats = int(values.get("dataset.repeats") or 1)
    batch = int(values.get("train.batch_size") or 1) * int(values.get("train.gradient_accumulation_steps") or 1)
    per_epoch = math.ceil(draws * repeats / batch) if train_images else 0
    epochs = int(values.get("train.max_train_epochs") or 0)
    if epochs:
        return (f"steps = {counted} × {repeats} repeats × {epochs} epochs / batch {batch} = "
                f"**{per_epoch * epochs}** ({held_out} held out for validation)")
    steps = int(values.get("train.max_train_steps") or 0)
    epochs_f = steps / per_epoch if per_epoch else 0
    return (f"{counted} × {repeats} repeats / batch {batch} = {per_epoch} steps per epoch; "
            f"**{steps}** steps ≈ {epochs_f:.1f} epochs ({held_out} held out for validation)")


# Sizes the resolution field holds when nobody chose otherwise: a family's native size (or the tiny demo's).
_NATIVE_SIZES = {64, 512, 768, 1024}


def resolution_for(model: str | None, current) -> int | None:
    """The model's native training size when the field still holds some family's default, else None.

    Picking an SDXL model moves 512 to 1024 and picking an SD 1.5 model moves
    1024 to 512; a size the user typed (say 640) is kept.
    """
    from core.base.models import native_resolution

    size = native_resolution(model) if model else None
    try:
        current = int(current)
    except (TypeError, ValueError):
        current = None
    if size and current in _NATIVE_SIZES and size != current:
        return size
    return None


def run_choices(outputs_dir: Path) -> list[tuple[str, str]]:
    """(label, path) of every run, newest first, with how it stands ("stopped at step 40, resumable ...")."""
    from core.training.run_folder import run_status

    return [(f"{run.name} — {run_status(run).label()}", str(run)) for run in list_runs(outputs_dir)]


# ------------------------------------------------------------------ gradio


# ------------------------------------------------------------ handlers (plain functions; build() wires them)

# What a preset leaves out: the run's own choices (its pictures, its model and its name), not settings.
NOT_IN_PRESETS = ("dataset.path", "model.path", "output.name")


def form_defaults() -> dict[str, Any]:
    """What the form shows before the user changes anything."""
    values = config_to_form(TrainConfig())
    values["train.max_train_steps"] = 500
    return values


def preset_values(values: dict[str, Any]) -> dict:
    """The settings the user changed from the form's defaults, as a partial config {"section": {key: value}}.

    Values are read as the config reads them (8.0 from a number field is 8; a list field is one item per line).
    """
    defaults = form_defaults()
    raw: dict = {}
    for key, value in values.items():
        hint = field_info(key)["type"]
        if hint is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        if key in NOT_IN_PRESETS or value is None or value == defaults.get(key):
            continue
        if typing.get_origin(hint) is list:
            value = [line.strip() for line in str(value).splitlines() if line.strip()]
        section, name = key.split(".")
        raw.setdefault(section, {})[name] = value
    return raw


def start_run(settings: AppSettings, manager: RunManager, values: dict[str, Any]):
    """Train with the form's settings: (status line, error box, run name).

    A name an earlier run has is never trained into (that run's status would show as this one's): the run
    gets the first free NAME-2, NAME-3..., the name field shows it and the status line says so.
    """
    import gradio as gr

    from core.training.run_folder import free_name, name_taken

    try:
        config = form_to_config(values, settings)
        from core.config_checks import preflight

        preflight(config_mod.resolve_paths(config))
        taken = name_taken(config_mod.resolve_paths(config))
        if taken:
            old = config.output.name
            config = config_mod.with_values(config, {"output.name": free_name(config_mod.resolve_paths(config))})
        run = manager.start(config)
    except (ConfigError, RunBusyError) as exc:
        return f"⚠️ {exc}", gr.skip(), gr.skip()
    if taken:
        return (f"Starting **{run.run_dir.name}**: **{old}** is an earlier run, kept as it is (to go on with it, "
                f"pick it under Past runs and resume it).", error_box(), config.output.name)
    return f"Starting **{run.run_dir.name}**…", error_box(), gr.skip()


def resume_run(manager: RunManager, run_dir, steps):
    """Continue a past run from its last save: (status line, error box)."""
    import gradio as gr

    if not run_dir:
        return "⚠️ pick a run under Past runs first", gr.skip()
    try:
        run = manager.resume(run_dir, int(steps or 0))
    except (ConfigError, RunBusyError) as exc:
        return f"⚠️ {exc}", gr.skip()
    return f"Starting **{run.run_dir.name}** again from its last save…", error_box()


def stop_run(manager: RunManager) -> str:
    return "Stopping after the current step and saving…" if manager.stop() else "No run is training."


def follow_run(manager: RunManager):
    """The live view of the active run: (progress, plot, samples, log, error, status); nothing when none."""
    import gradio as gr

    active = manager.follow_live()
    if active is None:
        return (gr.skip(),) * 9
    summary = active.poll()
    running = active.running
    return (progress_html(summary, running), loss_plot(summary), sample_gallery(summary), active.log_tail(),
            error_box(error_text(summary)), status_text(summary, running), *final_file(summary))


def live_view_handlers(manager: RunManager):
    """(on_tick, on_open): the timer's live view, sending each page only what changed (ui.unchanged), and
    opening a past run, after which the live view (if any) is sent whole again."""
    import gradio as gr

    sent = SentBefore()

    def on_tick(request):
        return sent.only_changed(request, follow_run(manager))

    def on_open(run_dir, request):
        sent.forget(request)
        return open_run(run_dir)

    for handler in (on_tick, on_open):  # the hint as an object (this module's are strings): gradio passes the page
        handler.__annotations__["request"] = gr.Request
    return on_tick, on_open


def open_run(run_dir):
    """A past run's view: (progress, plot, samples, error, its files)."""
    import gradio as gr

    from core.training.run_folder import run_status

    if not run_dir:
        return (gr.skip(),) * 8
    summary = summarize(run_dir)
    running = run_status(Path(run_dir)).state == "running"
    return (progress_html(summary, running), loss_plot(summary), sample_gallery(summary),
            error_box(error_text(summary)),
            run_files_text(Path(run_dir)), *final_file(summary))


def apply_preset(settings: AppSettings, keys: list[str], name, model: str | None = None):
    """The form's new values from a preset, in the order of ``keys`` (untouched fields skipped).

    The built-in "N GB GPU" presets are the planner's choice for the picked ``model`` at its native
    resolution (the SD 1.5 reference at 512 when no model is picked).
    """
    import gradio as gr

    from core.base.models import native_resolution

    if not name:
        return [gr.skip()] * len(keys)
    arch = model_architecture(model)
    size = (native_resolution(model) or 0) if arch else 0
    flat = {f"{s}.{k}": v for s, d in presets_mod.load_preset(settings.presets_dir, name, arch, size).items()
            for k, v in d.items()}
    return form_updates(keys, flat)


def model_architecture(model: str | None):
    """The layer shapes of a picked model (from its files, without loading it), or None."""
    from core.base.architecture import of_model

    if not model:
        return None
    try:
        return of_model(str(model))
    except Exception:  # noqa: BLE001 - unreadable or unknown models just get the default
        return None


def memory_estimate(settings: AppSettings, values: dict[str, Any], vram_gb) -> str:
    """The live "Estimated peak GPU memory" line (ui.memory_panel) for the form's ``values``."""
    return memory_panel.memory_estimate(lambda v: form_to_config(v, settings, check_paths=False), values, vram_gb)


def fit_gpu(settings: AppSettings, keys: list[str], values: dict[str, Any], vram_gb) -> list:
    """Fit my GPU (ui.memory_panel): updates for ``keys`` in order, then the memory line."""
    return memory_panel.fit_gpu(lambda v: form_to_config(v, settings, check_paths=False), keys, values, vram_gb)


def save_preset(settings: AppSettings, name, values: dict[str, Any]):
    """Save every setting the user changed as a preset: (status line, preset dropdown)."""
    import gradio as gr

    try:
        path = presets_mod.save_preset(settings.presets_dir, name or "", preset_values(values))
    except ConfigError as exc:
        return f"⚠️ {exc}", gr.skip()
    return f"Saved preset to {path}", gr.update(choices=presets_mod.list_presets(settings.presets_dir))


def model_picked(model, current):
    """Picking a model moves the resolution to its family's native size (unless the user chose another)."""
    import gradio as gr

    size = resolution_for(model, current)
    return gr.update(value=size) if size else gr.skip()


# ------------------------------------------------------------------ layout


def preset_row(settings: AppSettings):
    """The presets' row: (picker, Apply, name for saving, Save)."""
    import gradio as gr

    with gr.Row():
        preset = gr.Dropdown(presets_mod.list_presets(settings.presets_dir), label="Preset", value=None,
                             elem_id="train-preset", scale=3)
        load_preset = gr.Button("Apply preset", elem_id="train-apply-preset", scale=1)
        preset_name = gr.Textbox(label="Save settings as preset", placeholder="my preset", scale=3,
                                 elem_id="train-preset-name")
        save_preset_button = gr.Button("Save preset", elem_id="train-save-preset", scale=1)
    return preset, load_preset, preset_name, save_preset_button


def build(settings: AppSettings, manager: RunManager):
    """The Train tab's components and events (called inside a gr.Blocks)."""
    import gradio as gr

    from ui.widgets import dataset_choices, field_component

    defaults = form_defaults()
    components: dict[str, Any] = {}
    preset, load_preset, preset_name, save_preset_button = preset_row(settings)
    with gr.Row():
        with gr.Column(scale=2):
            for key in basic_fields():
                components[key] = field_component(key, defaults[key], settings)
            readout = gr.Markdown(elem_id="train-steps-readout")
            vram, fit_button, memory = memory_panel.memory_widgets()
            components.update(advanced_widgets(defaults, settings))
        with gr.Column(scale=3):
            with gr.Row():
                start = gr.Button("Train", variant="primary", elem_id="train-start")
                stop = gr.Button("Stop and save", variant="stop", elem_id="train-stop")
                enqueue = gr.Button("Add to queue", elem_id="train-enqueue")
            view = run_view()
            status, download, use_lora, final_lora = (view[k] for k in ("status", "download", "use_lora", "final"))
            progress, error, plot, samples, log = (view[k] for k in ("progress", "error", "plot", "samples", "log"))
            with gr.Accordion("Past runs", open=False, elem_id="train-past-runs"):
                runs = gr.Dropdown(label="Open a past run", choices=[], elem_id="train-runs")
                with gr.Row():
                    open_button = gr.Button("Open", elem_id="train-open-run")
                    resume_button = gr.Button("Resume", elem_id="train-resume-run")
                    resume_steps = gr.Number(0, precision=0, minimum=0, label="Train up to step",
                                             info="0: the run's own total. Another number trains it up to "
                                                  "that step instead (a finished run further).",
                                             elem_id="train-resume-steps")
            queue = queue_panel.build(settings)
    timer = gr.Timer(1.0)
    inputs = set(components.values())
    keys = {comp: key for key, comp in components.items()}

    def as_values(data: dict) -> dict[str, Any]:
        return {keys[c]: v for c, v in data.items() if c in keys}

    # Named functions: gradio's API names for the events (scripts and tests call them by these).
    def on_start(data):
        return start_run(settings, manager, as_values(data))

    def on_resume(run_dir, steps):
        return resume_run(manager, run_dir, steps)

    def on_stop():
        return stop_run(manager)

    on_tick, on_open = live_view_handlers(manager)

    def on_apply_preset(name, model):
        return apply_preset(settings, list(components), name, model)

    def on_save_preset(data):
        return save_preset(settings, data.get(preset_name), as_values(data))

    start.click(on_start, inputs=inputs, outputs=[status, error, components["output.name"]])
    stop.click(on_stop, outputs=status)
    queue_refresh = queue_panel.wire(settings, queue, enqueue, inputs,
                                     lambda data: form_to_config(as_values(data), settings))
    final = [download, use_lora, final_lora]
    timer.tick(on_tick, outputs=[progress, plot, samples, log, error, status, *final], show_progress="hidden")
    open_button.click(on_open, inputs=runs, outputs=[progress, plot, samples, error, status, *final])
    resume_button.click(on_resume, inputs=[runs, resume_steps], outputs=[status, error])
    load_preset.click(on_apply_preset, inputs=[preset, components["model.path"]], outputs=list(components.values()))
    save_preset_button.click(on_save_preset, inputs={preset_name} | inputs, outputs=[status, preset])
    readout_inputs = [components[k] for k in ("dataset.path", "dataset.repeats", "train.batch_size",
                                              "train.max_train_epochs", "train.max_train_steps",
                                              "dataset.validation_split", "train.gradient_accumulation_steps")]
    for comp in readout_inputs:
        comp.change(lambda data: steps_readout(as_values(data)), inputs=set(readout_inputs), outputs=readout)
    memory_refresh = memory_panel.wire_memory(
        lambda v: form_to_config(v, settings, check_paths=False), components, vram, fit_button, memory)
    components["model.path"].change(model_picked, [components["model.path"], components["dataset.resolution"]],
                                    components["dataset.resolution"])

    def on_load_lists():
        return (gr.update(choices=run_choices(settings.outputs_dir)),
                gr.update(choices=model_choices(settings.models_dir)), gr.update(choices=dataset_choices(settings)))

    return {
        "components": components,
        "model": components["model.path"],
        "dataset": components["dataset.path"],
        "timer": timer,
        # A page load re-reads the lists and re-attaches to the run in progress.
        "on_load": [Refresh(on_load_lists, [], [runs, components["model.path"], components["dataset.path"]]),
                    Refresh(on_tick, [], [progress, plot, samples, log, error, status, *final]), memory_refresh,
                    queue_refresh],
        "use_lora": use_lora,
        "final_lora": final_lora,
        "preset": preset,
    }
