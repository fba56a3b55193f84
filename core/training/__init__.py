"""Training: the run (phases and loop), its data from the caches, the objective and validation loss,
the run folder (files, resume state, lock, status) and the feature caches.
"""
