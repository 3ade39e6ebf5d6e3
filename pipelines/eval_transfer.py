"""Stage `eval_transfer`: the encoder pretrained on one dataset, judged on another (eval.transfer) by kNN and a
linear probe on its frozen features, against the random-init baseline."""

from pipelines.common import (
    METRICS,
    TRANSFER,
    TRANSFER_FEATURES,
    log_to_encoder_run,
    mean_std,
    read_params,
    run_stage,
    write_json,
)
from selfsup.data.arrays import Manifest
from selfsup.eval.features import load_features
from selfsup.eval.knn import knn_accuracy
from selfsup.eval.linear import topk_accuracy, train_linear_probe


def main() -> None:
    params = read_params()
    f = load_features(TRANSFER_FEATURES)
    target = Manifest.read(TRANSFER)
    metrics: dict = {
        "knn": {},
        "linear": {},
        "train_images": len(f["train_labels"]),
        "test_images": len(f["test_labels"]),
    }
    scores = {
        encoder: knn_accuracy(
            f[f"{encoder}_train"], f["train_labels"], f[f"{encoder}_test"], f["test_labels"], params.eval.knn
        )
        for encoder in ("pretrained", "baseline")
    }
    for k in params.eval.knn.k:
        metrics["knn"][f"k{k}"] = {
            "top1": round(scores["pretrained"][k], 4),
            "baseline_top1": round(scores["baseline"][k], 4),
        }
    for encoder, name in (("pretrained", "top1"), ("baseline", "baseline_top1")):
        values = []
        for seed in params.eval.seeds:
            probe = train_linear_probe(
                f[f"{encoder}_train"], f["train_labels"], len(target.class_names), params.eval.linear, seed
            )
            values.append(topk_accuracy(probe.logits(f[f"{encoder}_test"]), f["test_labels"]))
        metrics["linear"][name] = mean_std(values)
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
