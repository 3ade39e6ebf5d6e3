"""Stage `eval_transfer`: the encoder pretrained on one dataset, judged on another (eval.transfer) by kNN and a
linear probe on its frozen features, against the random-init baseline."""

from pipelines.common import (
    METRICS,
    TRANSFER,
    TRANSFER_FEATURES,
    log_to_encoder_run,
    read_params,
    run_stage,
    write_json,
)
from selfsup.data.arrays import Manifest
from selfsup.eval.features import load_features
from selfsup.eval.protocol import knn_against_baseline, linear_against_baseline


def main() -> None:
    params = read_params()
    f = load_features(TRANSFER_FEATURES)
    target = Manifest.read(TRANSFER)
    linear, _ = linear_against_baseline(f, ("test",), len(target.class_names), params.eval.linear, params.eval.seeds)
    metrics = {
        "knn": knn_against_baseline(f, "test", params.eval.knn),
        "linear": linear["test"],
        "train_images": len(f["train_labels"]),
        "test_images": len(f["test_labels"]),
    }
    write_json(METRICS / "eval_transfer.json", metrics)
    log_to_encoder_run(params, "transfer", metrics)
    linear = metrics["linear"]
    print(
        f"transfer to {target.source}: linear top-1 {linear['top1']['mean']:.2%} ± {linear['top1']['std']:.2%} "
        f"pretrained vs {linear['baseline_top1']['mean']:.2%} random init; "
        + ", ".join(f"kNN {k} {v['top1']:.2%} vs {v['baseline_top1']:.2%}" for k, v in metrics["knn"].items())
    )


if __name__ == "__main__":
    run_stage(main)
