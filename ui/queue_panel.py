"""The Train tab's queue: "Add to queue" beside Train, sweeps of a setting, and the queue's entries.

The queue itself is ``core.training.queue`` (a detached worker trains the entries one after another); this
module only turns the form into queue entries and shows them. The handlers are plain functions.
"""

from __future__ import annotations

from typing import Any

from core.config import ConfigError
from core.training.queue import RunQueue, parse_sweep
from ui.settings import AppSettings
from ui.train_fields import all_fields

# The settings people sweep most, first in the picker.
COMMON_SWEEPS = ["train.learning_rate", "lora.rank", "lora.alpha", "train.max_train_steps", "train.optimizer",
                 "train.lr_scheduler", "lora.type", "train.noise_offset", "train.batch_size", "train.text_encoder_lr"]
HEADERS = ["#", "Run", "Tries", "State", "Note"]
# Marks every font has (colour emoji are missing on many Linux desktops and show as boxes).
STATE_MARKS = {"waiting": "… waiting", "running": "▶ running", "completed": "✓ completed", "stopped": "■ stopped",
               "failed": "✗ failed", "cancelled": "– cancelled"}


def sweep_keys() -> list[str]:
    rest = sorted(key for key in all_fields() if key not in COMMON_SWEEPS and not key.startswith("output."))
    return [key for key in COMMON_SWEEPS if key in all_fields()] + rest


def queue_rows(queue: RunQueue) -> list[list[Any]]:
    return [[e.id, e.name, ", ".join(f"{k} = {v}" for k, v in e.sweep.items()), STATE_MARKS.get(e.state, e.state),
             e.message] for e in queue.entries()]


def queue_state(queue: RunQueue) -> str:
    entries = queue.entries()
    waiting = sum(e.state == "waiting" for e in entries)
    running = next((e for e in entries if e.state == "running"), None)
    worker = queue.worker()
    if running and worker:
        line = f"Training **{running.name}** (follow it above); {waiting} waiting."
    elif worker:
        line = f"The queue is starting its next run; {waiting} waiting."
    elif waiting:
        line = (f"{waiting} waiting; the queue is paused: **Start queue** goes on." if queue.paused
                else f"{waiting} waiting; **Start queue** trains them.")
    else:
        line = "Nothing waits. Set up a run above and press **Add to queue** (with a sweep below, one run per value)."
    return line


def entry_choices(queue: RunQueue) -> list[tuple[str, int]]:
    return [(f"{e.label} · {e.state}", e.id) for e in queue.entries()]


def view(settings: AppSettings, message: str | None = None):
    """(message, state line, table, entry picker update) for the queue as it stands; the message line is left
    as it is when ``message`` is None (the box's own refresh keeps what the last action said)."""
    import gradio as gr

    queue = RunQueue(settings.outputs_dir)
    try:
        state = queue_state(queue)
        rows = queue_rows(queue)
        choices = entry_choices(queue)
    except ConfigError as exc:
        return f"⚠️ {exc}", gr.skip(), gr.skip(), gr.skip()
    return (gr.skip() if message is None else message), state, rows, gr.update(choices=choices)


def refused(exc: Exception):
    import gradio as gr

    return f"⚠️ {exc}", gr.skip(), gr.skip(), gr.skip()


def add_to_queue(settings: AppSettings, config, sweeps: list[tuple[str, str]], start: bool = True):
    """Queue the form's run (or one run per swept value) and start the worker: (message, state, table, picker).

    ``config`` is the form's TrainConfig (or a callable that builds it, raising ConfigError); ``sweeps`` is
    [(setting, "v1, v2")] with empty ones left out.
    """

    from core import config as config_mod

    try:
        config = config() if callable(config) else config
        config = config_mod.resolve_paths(config)
        axes = [parse_sweep(f"{key}={values}") for key, values in sweeps if key and str(values).strip()]
        queue = RunQueue(settings.outputs_dir)
        if RunQueue(config.output.dir).folder != queue.folder:
            raise ConfigError(f"output.dir is {config.output.dir}; the app's queue trains runs in "
                              f"{settings.outputs_dir} (leave output.dir empty, or queue it with python -m core "
                              f"queue add)")
        added = queue.add(config, axes)
    except ConfigError as exc:
        return refused(exc)
    names = ", ".join(e.name for e in added)
    started = start and not queue.paused and queue.start_worker()
    return view(settings, f"Queued {len(added)} run(s): {names}." + (" The queue is working." if started else ""))


def act(settings: AppSettings, action: str, entry_id):
    """Start, pause, clear, or cancel/move the picked entry: (message, state, table, picker)."""
    queue = RunQueue(settings.outputs_dir)
    try:
        if action == "start":
            return view(settings, "The queue is working." if queue.start_worker()
                        else "Nothing to start: the queue is already working, or nothing waits.")
        if action == "pause":
            queue.pause()
            return view(settings, "The queue starts nothing new after the run in progress.")
        if action == "clear":
            return view(settings, f"Forgot {queue.clear()} ended entr(ies); their runs stay under Past runs.")
        if entry_id in (None, ""):
            raise ConfigError("pick an entry of the queue first")
        if action == "cancel":
            entry = queue.cancel(int(entry_id))
            return view(settings, f"{entry.name}: " + ("cancelled." if entry.state == "cancelled"
                                                         else "stopping after its current step (it saves)."))
        queue.move(int(entry_id), action)
        return view(settings, "")
    except ConfigError as exc:
        return refused(exc)


def resume_on_start(settings: AppSettings) -> bool:
    """At app start: a queue with waiting runs whose worker went (the app or the machine stopped), not paused by
    the user, goes on working."""
    queue = RunQueue(settings.outputs_dir)
    try:
        pending = any(e.state in ("waiting", "running") for e in queue.entries())
    except ConfigError:
        return False
    return pending and not queue.paused and queue.start_worker()


def build(settings: AppSettings) -> dict[str, Any]:
    """The queue box's components (inside a gr.Blocks); the Train tab wires Add to queue to it."""
    import gradio as gr

    keys = sweep_keys()
    with gr.Accordion("Queue and sweeps", open=False, elem_id="queue-box"):
        gr.Markdown("**Add to queue** queues the run set up above; the queue trains its runs one after another "
                    "(a failed run does not stop it; Stop saves the run and it moves on). For a **sweep**, pick a "
                    "setting and list values: one run each; two settings make a grid.")
        with gr.Row():
            key1 = gr.Dropdown(keys, value=None, label="Sweep setting", elem_id="queue-sweep-key")
            values1 = gr.Textbox(label="Values", placeholder="1e-4, 3e-4, 1e-3", elem_id="queue-sweep-values")
        with gr.Row():
            key2 = gr.Dropdown(keys, value=None, label="Second setting (a grid)", elem_id="queue-sweep-key2")
            values2 = gr.Textbox(label="Values", placeholder="4, 16", elem_id="queue-sweep-values2")
        message = gr.Markdown(elem_id="queue-message")
        state = gr.Markdown(elem_id="queue-state")
        table = gr.Dataframe(headers=HEADERS, value=[], interactive=False, wrap=True, elem_id="queue-table")
        with gr.Row():
            entry = gr.Dropdown([], value=None, label="Entry", elem_id="queue-entry", scale=3)
            buttons = {name: gr.Button(label, size="sm", elem_id=f"queue-{name}", scale=1) for name, label in
                       [("up", "Up"), ("down", "Down"), ("cancel", "Cancel or stop"), ("start", "Start queue"),
                        ("pause", "Pause"), ("clear", "Clear ended")]}
    outputs = [message, state, table, entry]
    for name, button in buttons.items():
        button.click(lambda picked, action=name: act(settings, action, picked), entry, outputs)
    return {"sweeps": [key1, values1, key2, values2], "outputs": outputs}


def wire(settings: AppSettings, queue: dict, enqueue, form_inputs: set, form_config):
    """Add to queue (the Train tab's button) and the queue box's own refresh; returns the page-load refresh.
    ``form_config(data)`` builds the form's TrainConfig from the event's data."""
    import gradio as gr

    from ui.widgets import Refresh

    key1, values1, key2, values2 = queue["sweeps"]

    def on_enqueue(data):
        sweeps = [(data[key1], data[values1]), (data[key2], data[values2])]
        return add_to_queue(settings, lambda: form_config(data), sweeps)

    def on_queue_tick():
        return view(settings)

    enqueue.click(on_enqueue, inputs=form_inputs | set(queue["sweeps"]), outputs=queue["outputs"])
    gr.Timer(3.0).tick(on_queue_tick, outputs=queue["outputs"], show_progress="hidden")
    return Refresh(on_queue_tick, [], queue["outputs"])
