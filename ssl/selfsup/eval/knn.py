"""Weighted k-nearest-neighbour classification on frozen features (Wu et al., 2018).

Each test feature votes with its k most cosine-similar training features, each vote weighted by
exp(similarity / temperature): the standard kNN monitor of SSL papers.
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
) -> np.ndarray:
    train = F.normalize(torch.from_numpy(train_features).float(), dim=1)
    labels = torch.from_numpy(train_labels).long()
    num_classes, k = int(labels.max()) + 1, min(config.k, len(train))
    predictions = []
    for start in range(0, len(test_features), chunk):  # chunks bound the similarity matrix's memory
        test = F.normalize(torch.from_numpy(test_features[start : start + chunk]).float(), dim=1)
        similarity, index = (test @ train.T).topk(k, dim=1)
        weights = (similarity / config.temperature).exp()
        votes = torch.zeros(len(test), num_classes).scatter_add_(1, labels[index], weights)
        predictions.append(votes.argmax(1))
    return torch.cat(predictions).numpy()


def knn_accuracy(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    config: KnnConfig,
) -> float:
    """Top-1 accuracy (a fraction) of the weighted kNN classifier."""
    return float((knn_predict(train_features, train_labels, test_features, config) == test_labels).mean())
