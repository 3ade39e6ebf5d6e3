"""Stage `summary`: every protocol's headline on test in one short file, metrics/summary.json, so that
`dvc metrics show metrics/summary.json` fits a terminal: top-1 of the pretrained encoder beside its random-init
baseline's (`_init`) for kNN (the champion metric's k), the linear probe, fine-tuning on the smallest label
fraction, and the linear probe on the transfer target. The detailed files stay beside it."""

import json

from pipelines.common import METRICS, champion_knn_k, read_params, run_stage, write_json


def main() -> None:
    params = read_params()
    knn, linear, semisup, transfer = (
        json.loads((METRICS / f"eval_{protocol}.json").read_text())
        for protocol in ("knn", "linear", "semisup", "transfer")
    )
    k = champion_knn_k(params.mlflow.champion_metric) or params.eval.knn.k[0]
    pairs = {}
    if "skipped" not in knn:
        pairs[f"knn{k}"] = knn["test"][f"k{k}"]
    if "skipped" not in linear:
        pairs["linear"] = {name: score["mean"] for name, score in linear["test"].items()}
    if "skipped" not in semisup:
        smallest = min(semisup, key=lambda key: float(key.removesuffix("pct")))
        pairs[smallest] = {name: score["mean"] for name, score in semisup[smallest]["test"].items()}
    pairs["transfer"] = {name: score["mean"] for name, score in transfer["linear"].items()}
    summary = {}
    for name, scores in pairs.items():
        summary[name], summary[f"{name}_init"] = scores["top1"], scores["baseline_top1"]
    protocols = {"knn": knn, "linear": linear, "semisup": semisup}
    skipped = {name: metrics["skipped"] for name, metrics in protocols.items() if "skipped" in metrics}
    if skipped:  # one reason for all of them: no labels (pipelines.common.missing_labels)
        summary["skipped"] = f"{', '.join(skipped)}: {next(iter(skipped.values()))}"
    write_json(METRICS / "summary.json", summary)
    print(
        "test top-1, pretrained (random init): "
        + ", ".join(f"{n} {s['top1']:.2%} ({s['baseline_top1']:.2%})" for n, s in pairs.items())
    )


if __name__ == "__main__":
    run_stage(main)
