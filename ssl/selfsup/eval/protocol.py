"""The evaluation protocol every stage shares: each score of the pretrained encoder beside its random-init
baseline's, evaluations that train repeated over seeds (mean and spread), and the metrics' MLflow names."""

from __future__ import annotations

import numpy as np

from selfsup.config import KnnConfig, LinearConfig
from selfsup.dotted import flatten
from selfsup.eval.knn import knn_accuracy
from selfsup.eval.linear import topk_accuracy, train_linear_probe


def mean_std(values: list[float]) -> dict[str, float]:
    """What every evaluation that trains reports over eval.seeds: the mean and the (population) spread."""
    array = np.asarray(values, dtype=np.float64)
    return {"mean": round(float(array.mean()), 4), "std": round(float(array.std()), 4)}


# The two encoders every evaluation scores the same way, and the prefix of their metric names.
ENCODERS = {"pretrained": "", "baseline": "baseline_"}


def summarise_over_seeds(scores: dict[str, list[float]]) -> dict[str, dict]:
    """{"test.top1": [one per seed]} -> {"test": {"top1": {"mean", "std"}}}."""
    summary: dict[str, dict] = {}
    for key, values in scores.items():
        split, name = key.split(".")
        summary.setdefault(split, {})[name] = mean_std(values)
    return summary


def knn_against_baseline(features: dict[str, np.ndarray], split: str, config: KnnConfig) -> dict[str, dict]:
    """kNN top-1 of `split` against the train features, per k: {"k20": {"top1": .., "baseline_top1": ..}}."""
    scores = {
        encoder: knn_accuracy(
            features[f"{encoder}_train"],
            features["train_labels"],
            features[f"{encoder}_{split}"],
            features[f"{split}_labels"],
            config,
        )
        for encoder in ENCODERS
    }
    return {
        f"k{k}": {f"{prefix}top1": round(scores[encoder][k], 4) for encoder, prefix in ENCODERS.items()}
        for k in config.k
    }


def linear_against_baseline(
    features: dict[str, np.ndarray],
    splits: tuple[str, ...],
    num_classes: int,
    config: LinearConfig,
    seeds: list[int],
    topk: tuple[int, ...] = (1,),
) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
    """Linear probes trained on the train features, one per seed and encoder, scored on each split.

    Returns the summary ({"test": {"top1": {"mean", "std"}, "baseline_top1": ...}}) and the pretrained
    encoder's predictions on each split by the first seed's probe (for the confusion matrix).
    """
    scores: dict[str, list[float]] = {}
    predictions: dict[str, np.ndarray] = {}
    for encoder, prefix in ENCODERS.items():
        for seed in seeds:
            probe = train_linear_probe(
                features[f"{encoder}_train"], features["train_labels"], num_classes, config, seed
            )
            for split in splits:
                logits = probe.logits(features[f"{encoder}_{split}"])
                for k in topk:
                    accuracy = topk_accuracy(logits, features[f"{split}_labels"], k)
                    scores.setdefault(f"{split}.{prefix}top{k}", []).append(accuracy)
                if encoder == "pretrained" and seed == seeds[0]:
                    predictions[split] = logits.argmax(1).numpy()
    return summarise_over_seeds(scores), predictions


def metric_values(tree: dict, prefix: str = "") -> dict[str, float]:
    """{"val": {"k20": {"top1": 0.9}}} -> {"val.k20.top1": 0.9}: MLflow's names for a metrics file's numbers."""
    return {
        name: float(value)
        for name, value in flatten(tree, prefix).items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }
