"""Nothing leaves this computer unless the user asks: no analytics, no telemetry, in every process.

The libraries the app stands on each have a way to phone home: Gradio's
analytics, the Hugging Face hub's telemetry, and onnxruntime's telemetry, which
diffusers pulls in whenever a pipeline is saved or loaded (not only the WD14
tagger uses it): a few seconds after the import it starts resolving
``mobile.events.data.microsoft.com``, and ``onnxruntime.disable_telemetry_events()``
does not stop that, while ``ORT_DISABLE_TELEMETRY=1`` set before the import
does. ``no_telemetry()`` sets each library's opt-out; the app's launcher and
the engine's command line call it before importing any of them, and the
training and captioning processes inherit it. Model downloads from the hub
stay possible: they are what the user asked for when they name a hub model.
"""

from __future__ import annotations

import os

ENVIRONMENT = {
    "GRADIO_ANALYTICS_ENABLED": "False",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "ORT_DISABLE_TELEMETRY": "1",
}


def no_telemetry() -> None:
    """Set the opt-out variables for this process and the ones it starts (a value the user set is kept)."""
    for key, value in ENVIRONMENT.items():
        os.environ.setdefault(key, value)
