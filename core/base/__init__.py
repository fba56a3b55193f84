"""Base models: families (SD 1.x, 2.x, SDXL), loading folders, hub ids and single files, text encoders,
pipelines and sampling, and tiny random-weight models for tests and demos.
"""
