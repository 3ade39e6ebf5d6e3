"""Datasets -> uint8 arrays on disk, and batched view augmentations on the training device."""
