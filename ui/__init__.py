"""The Gradio app. It drives the engine in ``core`` through ``python -m core`` subprocesses."""
