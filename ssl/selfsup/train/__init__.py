"""Pretraining: the per-worker loop, its step and optimiser (no Ray here), and the Ray Train entry."""
