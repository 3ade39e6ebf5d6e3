"""Weighted k-nearest-neighbour classification on frozen features (Wu et al., 2018).

Each test feature votes with its k most cosine-similar training features, each vote weighted by
exp(similarity / temperature): the standard kNN monitor of SSL papers. Neighbours are ranked once for the
largest k, so every k of `config.k` costs one pass.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from selfsup.config import KnnConfig


@torch.no_grad()
def knn_predict(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    config: KnnConfig,
    chunk: int = 1024,
) -> dict[int, np.ndarray]:
    """Predicted labels of the test features, for each k of config.k (k is clipped to the training set)."""
    train = F.normalize(torch.from_numpy(train_features).float(), dim=1)
    labels = torch.tensor(train_labels, dtype=torch.long)  # a copy: arrays from Ray's object store are read-only
    num_classes, largest = int(labels.max()) + 1, min(max(config.k), len(train))
    predictions: dict[int, list[torch.Tensor]] = {k: [] for k in config.k}
    for start in range(0, len(test_features), chunk):  # chunks bound the similarity matrix's memory
        test = F.normalize(torch.from_numpy(test_features[start : start + chunk]).float(), dim=1)
        similarity, index = (test @ train.T).topk(largest, dim=1)  # sorted: the first k are the k nearest
        weights = (similarity / config.temperature).exp()
        for k in config.k:
            k_used = min(k, largest)
            votes = torch.zeros(len(test), num_classes).scatter_add_(1, labels[index[:, :k_used]], weights[:, :k_used])
            predictions[k].append(votes.argmax(1))
    return {k: torch.cat(chunks).numpy() for k, chunks in predictions.items()}


def knn_accuracy(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    config: KnnConfig,
) -> dict[int, float]:
    """Top-1 accuracy (a fraction) of the weighted kNN classifier, for each k of config.k."""
    predicted = knn_predict(train_features, train_labels, test_features, config)
    return {k: float((p == test_labels).mean()) for k, p in predicted.items()}
