"""Stage `eval_knn`: weighted kNN top-1 for every k of eval.knn.k, on val and test, of the pretrained encoder
and of its random-init baseline; pictures: a retrieval grid and a t-SNE map of the test embeddings."""

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
from selfsup.data.arrays import Manifest, load_split
from selfsup.eval.features import load_features
from selfsup.eval.pictures import nearest_neighbours, plot_embedding_map, plot_retrieval_grid
from selfsup.eval.protocol import knn_against_baseline


def main() -> None:
    params = read_params()
    if reason := missing_labels(Manifest.read(evaluation_data())):
        pictures = (PLOTS / "retrieval.png", PLOTS / "embedding_map.png")
        write_skipped("eval_knn", reason, METRICS / "eval_knn.json", pictures)
        return
    f = load_features(FEATURES)
    metrics = {split: knn_against_baseline(f, split, params.eval.knn) for split in ("val", "test")}
    write_json(METRICS / "eval_knn.json", metrics)
    pictures = _pictures(f, params.train.seed)
    log_to_encoder_run(params, "knn", metrics, pictures)
    for k, score in metrics["test"].items():
        print(f"kNN ({k}) test top-1: {score['top1']:.2%} pretrained vs {score['baseline_top1']:.2%} random init")


def _pictures(f: dict, seed: int) -> list:
    folder = evaluation_data()
    manifest = Manifest.read(folder)
    train, test = load_split(folder, "train"), load_split(folder, "test")
    queries = [int(np.flatnonzero(test.labels == c)[0]) for c in np.unique(test.labels)][:10]  # one per class
    neighbours = nearest_neighbours(f["pretrained_train"], f["pretrained_test"][queries], k=8)
    retrieval = plot_retrieval_grid(
        test.images[queries],
        test.labels[queries],
        train.images[neighbours],
        train.labels[neighbours],
        PLOTS / "retrieval.png",
        manifest.class_names,
    )
    embedding = plot_embedding_map(
        f["pretrained_test"], f["test_labels"], manifest.class_names, PLOTS / "embedding_map.png", seed
    )
    return [retrieval, embedding]


if __name__ == "__main__":
    run_stage(main)
