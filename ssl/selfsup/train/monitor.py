"""The accuracy watched during pretraining: kNN top-1 of the validation split against the training images (and,
for a sweep that asks for it, a linear probe's).

Labels serve this monitor only; no method sees them. It is cheap by design (one forward pass over the
images in eval mode, no training), so it can run every few epochs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from selfsup.config import KnnConfig, LinearConfig
from selfsup.eval.features import extract_features
from selfsup.eval.knn import knn_accuracy
from selfsup.eval.linear import linear_probe_accuracy


@dataclass(frozen=True)
class KnnMonitor:
    train_labels: np.ndarray  # of the pretraining images, in their order
    val_images: np.ndarray  # uint8 N x H x W x 3, held out of pretraining
    val_labels: np.ndarray
    k: int = 20
    batch_size: int = 512
    linear: LinearConfig | None = None  # also a linear probe on the training features, scored on val

    @torch.no_grad()
    def measure(self, encoder: torch.nn.Module, train_images: torch.Tensor) -> dict[str, float]:
        """{"monitor_knn_top1": ..., and "monitor_linear_top1" with a linear probe} (fractions) of the encoder's
        features; `train_images` are the uint8 images on the device."""
        was_training = encoder.training
        device = train_images.device
        train = extract_features(encoder, train_images, self.batch_size, device)
        val = extract_features(encoder, self.val_images, self.batch_size, device)
        encoder.train(was_training)
        config = KnnConfig(k=self.k, temperature=0.07)
        measured = {"monitor_knn_top1": knn_accuracy(train, self.train_labels, val, self.val_labels, config)[self.k]}
        if self.linear is not None:
            with torch.enable_grad(), torch.random.fork_rng(devices=[]):  # the probe's init draws leave training's
                measured["monitor_linear_top1"] = linear_probe_accuracy(
                    train, self.train_labels, val, self.val_labels, self.linear
                )
        return measured

    def accuracy(self, encoder: torch.nn.Module, train_images: torch.Tensor) -> float:
        """The kNN top-1 alone (a fraction)."""
        return self.measure(encoder, train_images)["monitor_knn_top1"]
