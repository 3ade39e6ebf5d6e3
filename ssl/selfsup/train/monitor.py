"""What pretraining watches on held-out images every few epochs: RankMe of their representations, which needs no
labels, and, given labelled evaluation data, kNN top-1 of its validation split against its training images (and,
for a sweep that asks for it, a linear probe's).

Labels serve this monitor only; no method sees them. It is cheap by design (forward passes in eval mode, no
training but the optional probe), so it can run every few epochs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from selfsup.config import KnnConfig, LinearConfig
from selfsup.eval.features import extract_features
from selfsup.eval.knn import knn_accuracy
from selfsup.eval.linear import linear_probe_accuracy
from selfsup.train.collapse import rankme


@dataclass(frozen=True)
class LabelledProbe:
    """Labelled evaluation data: its validation images are classified by their neighbours among its training
    images, the pretraining images themselves when `bank_images` is None (the same dataset)."""

    bank_labels: np.ndarray
    val_images: np.ndarray  # uint8 N x H x W x 3, held out of pretraining
    val_labels: np.ndarray
    bank_images: np.ndarray | None = None
    k: int = 20
    linear: LinearConfig | None = None  # also a linear probe on the bank's features, scored on val


@dataclass(frozen=True)
class Monitor:
    held_out: np.ndarray  # uint8 images of the pretraining data held out of it (its val split): RankMe
    probe: LabelledProbe | None = None  # None: no labelled evaluation data
    batch_size: int = 512

    @torch.no_grad()
    def measure(
        self, encoder: torch.nn.Module, device: torch.device, train_images: torch.Tensor | None = None
    ) -> dict[str, float]:
        """{"monitor_rankme": ...}, with labels also "monitor_knn_top1" (and "monitor_linear_top1" with a linear
        probe), the top-1 as fractions; `train_images` are the uint8 pretraining images on the device (None when
        they are streamed: the probe then has a bank of its own)."""
        was_training = encoder.training
        features = lambda images: extract_features(encoder, images, self.batch_size, device)  # noqa: E731
        measured = {"monitor_rankme": rankme(torch.from_numpy(features(self.held_out)))}
        probe = self.probe
        if probe is not None:
            bank = features(train_images if probe.bank_images is None else probe.bank_images)
            val = features(probe.val_images)
            config = KnnConfig(k=probe.k, temperature=0.07)
            measured["monitor_knn_top1"] = knn_accuracy(bank, probe.bank_labels, val, probe.val_labels, config)[probe.k]
            if probe.linear is not None:
                with torch.enable_grad(), torch.random.fork_rng(devices=[]):  # the probe's draws leave training's
                    measured["monitor_linear_top1"] = linear_probe_accuracy(
                        bank, probe.bank_labels, val, probe.val_labels, probe.linear
                    )
        encoder.train(was_training)
        return measured
