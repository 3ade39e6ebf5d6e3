"""What every stage shares: the repo's paths, params.yaml read and validated, errors made readable."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import yaml

from selfsup.config import KnnConfig, LinearConfig, Params, load_params
from selfsup.errors import ConfigError, SelfsupError

ROOT = Path(__file__).resolve().parent.parent
PREPARED = ROOT / "data" / "prepared"
CHECKPOINTS = ROOT / "checkpoints"
ENCODER = ROOT / "models" / "encoder.pt"
FEATURES = ROOT / "features" / "features.npz"
TRANSFER = ROOT / "data" / "transfer"  # the transfer target, prepared like data/prepared
TRANSFER_FEATURES = ROOT / "features" / "transfer.npz"
LABEL_SUBSETS = ROOT / "data" / "label_subsets.json"
METRICS = ROOT / "metrics"
PLOTS = ROOT / "plots"


def read_params(path: Path = ROOT / "params.yaml") -> Params:
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"no {path}: copy params.yaml from the repository") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    return load_params(raw)


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage; an expected failure prints one clear line (no traceback) and exits 2."""
    try:
        main()
    except (SelfsupError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


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
    from selfsup.eval.knn import knn_accuracy

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
    from selfsup.eval.linear import topk_accuracy, train_linear_probe

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


def flatten_metrics(tree: dict, prefix: str = "") -> dict[str, float]:
    """{"val": {"k20": {"top1": 0.9}}} -> {"val.k20.top1": 0.9}: MLflow's names for a metrics file's numbers."""
    flat: dict[str, float] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_metrics(value, name + "."))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


def log_to_encoder_run(params: Params, protocol: str, metrics: dict, pictures: list[Path] = ()) -> None:
    """An evaluation's metrics (named `<protocol>.<key path>`) and pictures, in the MLflow run that trained
    the encoder."""
    from selfsup.data.arrays import file_sha256
    from selfsup.tracking import log_evaluation

    log_evaluation(params.mlflow, ROOT, file_sha256(ENCODER), flatten_metrics(metrics, protocol + "."), list(pictures))


def champion_metric_key(name: str) -> str:
    """mlflow.champion_metric -> the validation metric it names (the champion is never chosen on test)."""
    if name == "linear_top1":
        return "linear.val.top1.mean"
    k = name.removeprefix("knn_k").removesuffix("_top1")
    return f"knn.val.k{k}.top1"
