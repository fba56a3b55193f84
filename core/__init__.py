"""The training engine: config, dataset, LoRA training, export and sampling.

Nothing here imports gradio or ``ui``; the app drives this package through the
``python -m core`` command line and the JSON-lines events it writes.
Importing ``core`` is cheap: heavy libraries load inside the functions that
need them.
"""

__version__ = "0.1.0"
