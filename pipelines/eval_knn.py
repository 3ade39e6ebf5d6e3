"""Stage `eval_knn`: weighted kNN top-1 of the pretrained encoder and of its random-init baseline."""

from pipelines.common import FEATURES, METRICS, read_params, run_stage, write_json
from selfsup.eval.features import load_features
from selfsup.eval.knn import knn_accuracy


def main() -> None:
    config = read_params().eval.knn
    f = load_features(FEATURES)
    scores = {
        name: knn_accuracy(f[f"{name}_train"], f["train_labels"], f[f"{name}_test"], f["test_labels"], config)
        for name in ("pretrained", "baseline")
    }
    write_json(
        METRICS / "eval_knn.json",
        {"top1": round(scores["pretrained"], 4), "baseline_top1": round(scores["baseline"], 4)},
    )
    print(f"kNN (k={config.k}) top-1: {scores['pretrained']:.2%} pretrained vs {scores['baseline']:.2%} random init")


if __name__ == "__main__":
    run_stage(main)
