"""Stage `eval_linear`: linear-probe top-1 (and top-5 with more than 5 classes) on val and test, mean and spread
over eval.seeds, of the pretrained encoder and of its random-init baseline; picture: the confusion matrix."""

import csv

import numpy as np

from pipelines.common import (
    FEATURES,
    METRICS,
    PLOTS,
    evaluation_data,
    log_to_encoder_run,
    missing_labels,
    read_params,
    run_stage,
    write_json,
    write_skipped,
)
from selfsup.data.arrays import Manifest
from selfsup.eval.features import load_features
from selfsup.eval.pictures import plot_confusion_matrix
from selfsup.eval.protocol import linear_against_baseline


def main() -> None:
    params = read_params()
    manifest = Manifest.read(evaluation_data())
    if reason := missing_labels(manifest):
        tables = [(PLOTS / "confusion.csv", ["actual", "predicted"])]
        write_skipped("eval_linear", reason, METRICS / "eval_linear.json", (PLOTS / "confusion.png",), tables)
        return
    f = load_features(FEATURES)
    class_names = manifest.class_names
    topk = (1, 5) if len(class_names) > 5 else (1,)
    metrics, predictions = linear_against_baseline(
        f, ("val", "test"), len(class_names), params.eval.linear, params.eval.seeds, topk
    )
    write_json(METRICS / "eval_linear.json", metrics)
    pictures = [_confusion(f["test_labels"], predictions["test"], class_names)]
    log_to_encoder_run(params, "linear", metrics, pictures)
    test = metrics["test"]
    print(
        f"linear probe test top-1: {test['top1']['mean']:.2%} ± {test['top1']['std']:.2%} pretrained vs "
        f"{test['baseline_top1']['mean']:.2%} ± {test['baseline_top1']['std']:.2%} random init "
        f"({len(params.eval.seeds)} seeds)"
    )


def _confusion(labels: np.ndarray, predictions: np.ndarray, class_names: list[str]):
    """plots/confusion.csv (DVC's confusion template) and plots/confusion.png, of the first seed's probe on test."""
    PLOTS.mkdir(exist_ok=True)
    with open(PLOTS / "confusion.csv", "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["actual", "predicted"])
        writer.writerows([class_names[a], class_names[p]] for a, p in zip(labels, predictions))
    return plot_confusion_matrix(labels, predictions, class_names, PLOTS / "confusion.png")


if __name__ == "__main__":
    run_stage(main)
