"""Stage `eval_knn`: weighted kNN top-1 of the pretrained encoder and of its random-init baseline."""

from pipelines.common import read_params, run_stage, write_scores_against_baseline
from selfsup.eval.knn import knn_accuracy


def main() -> None:
    config = read_params().eval.knn
    write_scores_against_baseline("eval_knn", f"kNN (k={config.k}) top-1", lambda *f: knn_accuracy(*f, config))


if __name__ == "__main__":
    run_stage(main)
