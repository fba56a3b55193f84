"""The dataset: finding pictures and captions, the manifest (dataset.toml), decoding pictures, aspect
buckets, the health report and the app's own datasets (imports, caption edits).
"""
