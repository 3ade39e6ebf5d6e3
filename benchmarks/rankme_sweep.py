"""How well RankMe, which needs no labels, ranks the trials of a sweep as the labelled monitor does.

Clones the repository (HEAD, or --working-tree) into a temporary folder, prepares its data, and runs the sweep
of its params.yaml (`python -m pipelines.tune`, with `--set` overrides) without early stopping, so that every
trial runs its epochs. Each trial reports the monitor's val kNN top-1 (and the linear probe's, when tune.metric
asks for it) and RankMe of the held-out images at the same epochs; the script reads each trial's last scores from
MLflow and prints them with RankMe's Spearman correlation with each.

    python benchmarks/rankme_sweep.py                          # the shipped sweep on the digits: 8 trials, ~3 min
    python benchmarks/rankme_sweep.py --set tune.num_samples=16
    python benchmarks/rankme_sweep.py --set tune.metric=monitor_linear_top1   # the linear probe's top-1 too
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

from repro_time import REPO, clone, override_params, stage_env


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a param")
    parser.add_argument("--working-tree", action="store_true", help="copy the files as they are instead of HEAD")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "rankme_sweep.json")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    from scipy.stats import spearmanr

    with tempfile.TemporaryDirectory(prefix="rankme-sweep-") as folder:
        repo = Path(folder) / "repo"
        clone(repo, args.working_tree)
        override_params(repo, ["tune.scheduler=fifo", "tune.name=rankme", *args.set])
        env = stage_env(Path(folder), repo)
        for command in (["dvc", "repro", "prepare", "prepare_eval"], ["python", "-m", "pipelines.tune"]):
            result = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True)
            if result.returncode:
                raise SystemExit((result.stdout + result.stderr)[-3000:])
        import mlflow

        client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
        experiment = client.get_experiment_by_name("selfsup")
        runs = client.search_runs([experiment.experiment_id], "tags.mlflow.parentRunId != ''")
        rows = [row for row in (last_scores(client, run) for run in runs) if row]
    scores = [name for name in LABELLED if rows and name in rows[0]]
    rows.sort(key=lambda row: -row[scores[-1]])
    spearman = {
        name: round(spearmanr([r["rankme"] for r in rows], [r[name] for r in rows]).statistic, 2)
        for name in scores
        if len(rows) > 2
    }
    keys = [k for k in rows[0] if k not in (*scores, "rankme", "epoch")] if rows else []
    print("| " + " | ".join(LABELLED[name] for name in scores) + " | RankMe | epoch | " + " | ".join(keys) + " |")
    print("|---" * (len(scores) + 2 + len(keys)) + "|")
    for row in rows:
        labelled = " | ".join(f"{100 * row[name]:.2f}" for name in scores)
        values = " | ".join(f"{float(row[k]):.4g}" for k in keys)
        print(f"| {labelled} | {row['rankme']:.2f} | {row['epoch']} | {values} |")
    for name, rho in spearman.items():
        print(f"Spearman of RankMe with {LABELLED[name]} over {len(rows)} trials: {rho}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"overrides": args.set, "rows": rows, "spearman": spearman}, indent=2) + "\n")


# The labelled scores a trial's monitor may report (the linear probe's when tune.metric asks for it).
LABELLED = {"monitor_knn_top1": "val kNN top-1", "monitor_linear_top1": "val linear top-1"}


def last_scores(client, run) -> dict | None:
    """A trial's labelled scores and RankMe at the last epoch its monitor measured them all; None if it never did."""
    history = {
        name: {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)}
        for name in (*LABELLED, "monitor_rankme")
    }
    measured = [name for name in LABELLED if history[name]]
    epochs = set(history["monitor_rankme"]).intersection(*(history[name] for name in measured))
    if not measured or not epochs:
        return None
    epoch = max(epochs)
    params = {k: v for k, v in run.data.params.items() if k.startswith(("train.lr", "method."))}
    scores = {name: history[name][epoch] for name in measured}
    return {**scores, "rankme": history["monitor_rankme"][epoch], "epoch": epoch, **params}


if __name__ == "__main__":
    main()
