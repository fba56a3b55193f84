"""LoRA files: the kohya/A1111 and diffusers layouts, their names per family, verify-lora, merging into
a model and writing single-file checkpoints.
"""
