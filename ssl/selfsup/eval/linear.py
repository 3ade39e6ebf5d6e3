"""Linear probe: a linear classifier trained on frozen, standardised features."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from selfsup.config import LinearConfig


def linear_probe_accuracy(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    config: LinearConfig,
    seed: int = 0,
) -> float:
    """Train softmax regression with AdamW and cosine decay; return top-1 accuracy (a fraction) on test."""
    generator = torch.Generator().manual_seed(seed)
    x_train, x_test = torch.from_numpy(train_features).float(), torch.from_numpy(test_features).float()
    # Standardise with train statistics (as a parameter-free BatchNorm would): lr then means the same
    # thing for every encoder, however its features are scaled.
    mean, std = x_train.mean(0), x_train.std(0).clamp(min=1e-6)
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    y_train = torch.from_numpy(train_labels).long()
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    classifier = torch.nn.Linear(x_train.shape[1], num_classes)
    torch.nn.init.zeros_(classifier.weight)
    torch.nn.init.zeros_(classifier.bias)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = max(1, -(-len(x_train) // config.batch_size))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.epochs * steps_per_epoch)
    for _ in range(config.epochs):
        order = torch.randperm(len(x_train), generator=generator)
        for start in range(0, len(order), config.batch_size):
            batch = order[start : start + config.batch_size]
            loss = F.cross_entropy(classifier(x_train[batch]), y_train[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    with torch.no_grad():
        predictions = classifier(x_test).argmax(1).numpy()
    return float((predictions == test_labels).mean())
