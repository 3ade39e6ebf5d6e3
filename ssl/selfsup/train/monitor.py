"""The accuracy watched during pretraining: kNN top-1 of the validation split against the training images.

Labels serve this monitor only; no method sees them. It is cheap by design (one forward pass over the
images in eval mode, no training), so it can run every few epochs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from selfsup.config import KnnConfig
from selfsup.eval.features import extract_features
from selfsup.eval.knn import knn_accuracy


@dataclass(frozen=True)
class KnnMonitor:
    train_labels: np.ndarray  # of the pretraining images, in their order
    val_images: np.ndarray  # uint8 N x H x W x 3, held out of pretraining
    val_labels: np.ndarray
    k: int = 20
    batch_size: int = 512

    @torch.no_grad()
    def accuracy(self, encoder: torch.nn.Module, train_images: torch.Tensor) -> float:
        """kNN top-1 (a fraction) of the encoder's features; `train_images` are the uint8 images on the device."""
        was_training = encoder.training
        device = train_images.device
        train = extract_features(encoder, train_images, self.batch_size, device)
        val = extract_features(encoder, self.val_images, self.batch_size, device)
        encoder.train(was_training)
        config = KnnConfig(k=self.k, temperature=0.07)
        return knn_accuracy(train, self.train_labels, val, self.val_labels, config)[self.k]
