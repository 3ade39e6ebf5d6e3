"""Linear probe: a linear classifier trained on frozen, standardised features."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from selfsup.config import LinearConfig


@dataclass
class LinearProbe:
    """A trained probe with the training features' statistics it standardises by."""

    classifier: torch.nn.Linear
    mean: torch.Tensor
    std: torch.Tensor

    @torch.no_grad()
    def logits(self, features: np.ndarray) -> torch.Tensor:
        return self.classifier((torch.from_numpy(features).float() - self.mean) / self.std)


def train_linear_probe(
    train_features: np.ndarray, train_labels: np.ndarray, num_classes: int, config: LinearConfig, seed: int = 0
) -> LinearProbe:
    """Softmax regression with AdamW, cosine-decayed or constant lr, from zero weights; `seed` orders the batches."""
    generator = torch.Generator().manual_seed(seed)
    x_train = torch.from_numpy(train_features).float()
    # Standardise with train statistics (as a parameter-free BatchNorm would): lr then means the same
    # thing for every encoder, however its features are scaled.
    mean, std = x_train.mean(0), x_train.std(0).clamp(min=1e-6)
    x_train = (x_train - mean) / std
    y_train = torch.from_numpy(train_labels).long()
    classifier = torch.nn.Linear(x_train.shape[1], num_classes)
    torch.nn.init.zeros_(classifier.weight)
    torch.nn.init.zeros_(classifier.bias)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = max(1, -(-len(x_train) // config.batch_size))
    schedule = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.epochs * steps_per_epoch)
        if config.schedule == "cosine"
        else torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
    )
    for _ in range(config.epochs):
        order = torch.randperm(len(x_train), generator=generator)
        for start in range(0, len(order), config.batch_size):
            batch = order[start : start + config.batch_size]
            loss = F.cross_entropy(classifier(x_train[batch]), y_train[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return LinearProbe(classifier, mean, std)


def topk_accuracy(logits: torch.Tensor, labels: np.ndarray, k: int = 1) -> float:
    """The fraction of rows whose label is among their k highest scores."""
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return float((top == torch.from_numpy(labels).long()[:, None]).any(1).float().mean())


def linear_probe_accuracy(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    config: LinearConfig,
    seed: int = 0,
) -> float:
    """Train a probe and return its top-1 accuracy (a fraction) on test."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    probe = train_linear_probe(train_features, train_labels, num_classes, config, seed)
    return topk_accuracy(probe.logits(test_features), test_labels)
