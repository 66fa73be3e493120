"""Shared plumbing for the on-policy self-distillation scripts (`train_sdft.py`, `train_sdpo.py`)."""
