"""How well RankMe, which needs no labels, ranks the trials of a sweep as the labelled monitor does.

Clones the repository (HEAD, or --working-tree) into a temporary folder, prepares its data, and runs the sweep
of its params.yaml (`python -m pipelines.tune`, with `--set` overrides) without early stopping, so that every
trial runs its epochs. Each trial reports the monitor's val kNN top-1 and RankMe of the held-out images at the
same epochs; the script reads each trial's last pair from MLflow and prints them with their Spearman correlation.

    python benchmarks/rankme_sweep.py                          # the shipped sweep on the digits: 8 trials, ~3 min
    python benchmarks/rankme_sweep.py --set tune.num_samples=16
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
        rows = []
        for run in runs:
            knn = client.get_metric_history(run.info.run_id, "monitor_knn_top1")
            rankme = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "monitor_rankme")}
            if not knn or knn[-1].step not in rankme:
                continue
            last = max(knn, key=lambda m: m.step)
            params = {k: v for k, v in run.data.params.items() if k.startswith(("train.lr", "method."))}
            rows.append({"knn_top1": last.value, "rankme": rankme[last.step], "epoch": last.step, **params})
    rows.sort(key=lambda row: -row["knn_top1"])
    rho = spearmanr([r["rankme"] for r in rows], [r["knn_top1"] for r in rows]).statistic if len(rows) > 2 else None
    keys = [k for k in rows[0] if k not in ("knn_top1", "rankme", "epoch")] if rows else []
    print("| val kNN top-1 | RankMe | epoch | " + " | ".join(keys) + " |")
    print("|---|---|---|" + "---|" * len(keys))
    for row in rows:
        values = " | ".join(f"{float(row[k]):.4g}" for k in keys)
        print(f"| {100 * row['knn_top1']:.2f} | {row['rankme']:.2f} | {row['epoch']} | {values} |")
    print(f"\nSpearman of RankMe with val kNN top-1 over {len(rows)} trials: {rho if rho is None else round(rho, 2)}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"overrides": args.set, "rows": rows, "spearman": rho}, indent=2) + "\n")


if __name__ == "__main__":
    main()
