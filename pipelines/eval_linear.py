"""Stage `eval_linear`: linear-probe top-1 of the pretrained encoder and of its random-init baseline."""

from pipelines.common import read_params, run_stage, write_scores_against_baseline
from selfsup.eval.linear import linear_probe_accuracy


def main() -> None:
    params = read_params()
    write_scores_against_baseline(
        "eval_linear",
        "linear probe top-1",
        lambda *f: linear_probe_accuracy(*f, params.eval.linear, params.train.seed),
    )


if __name__ == "__main__":
    run_stage(main)
