"""Every method through the pipeline on the same data and budget: kNN and linear top-1 against random init.

Clones the repository (committed HEAD, or with --working-tree the files as they are now) into a
temporary folder, applies the overrides (`--set key=value`, repeatable) to its params.yaml, then runs
`dvc exp run eval_knn eval_linear -S method.name=NAME` there for each method, one after the other, as a
user would. Prints a Markdown table (docs/methods.md's) and writes the figures as JSON.

    python benchmarks/method_table.py               # the embedded digits, all 16 methods, ~45 min on 2 cores
    python benchmarks/method_table.py --methods simclr moco --set train.epochs=5

With --require-beats-random-init it exits 1, naming them, when any method fails to beat its random-init
baseline on both protocols: the issue's check that each method is worth running at the default budget
(40-100 s a method on 2 cores, too long for the test suite).
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import tempfile
import time
from pathlib import Path

from repro_time import REPO, clone, override_params, stage_env

from pipelines.common import read_params
from selfsup.methods import METHODS
from selfsup.params import learning_rate


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a param (repeatable)")
    parser.add_argument(
        "--working-tree", action="store_true", help="copy the files as they are instead of cloning HEAD"
    )
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "method_table.json")
    parser.add_argument(
        "--require-beats-random-init", action="store_true", help="exit 1 unless every method beats random init"
    )
    return parser.parse_args()


def not_beating_random_init(rows: list[dict]) -> list[str]:
    """The methods that failed, or did not beat their random-init baseline on kNN and on the linear probe."""
    return [
        row["method"]
        for row in rows
        if "error" in row
        or row["knn_top1"] <= row["knn_random_init"]
        or row["linear_top1"] <= row["linear_random_init"]
    ]


def run_method(repo: Path, env: dict[str, str], method: str) -> dict:
    """One `dvc exp run` of the evaluations for a method; its figures as the pipeline wrote them."""
    command = ["dvc", "exp", "run", "-n", method, "eval_knn", "eval_linear", "-S", f"method.name={method}"]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode:
        print(result.stdout[-3000:] + result.stderr[-3000:], flush=True)
        return {"method": method, "error": (result.stderr or result.stdout).strip().splitlines()[-1]}
    read = lambda name: json.loads((repo / "metrics" / f"{name}.json").read_text())  # noqa: E731
    pretrain = read("pretrain")
    with (repo / "plots" / "pretrain.csv").open() as file:
        last_epoch = list(csv.DictReader(file))[-1]
    params = read_params(repo / "params.yaml")
    knn = read("eval_knn")["test"][f"k{reported_k(params)}"]
    linear = read("eval_linear")["test"]
    return {
        "method": method,
        "lr": learning_rate(params.train, params.method),
        "knn_k": reported_k(params),
        "knn_top1": knn["top1"],
        "knn_random_init": knn["baseline_top1"],
        "linear_top1": linear["top1"]["mean"],
        "linear_random_init": linear["baseline_top1"]["mean"],
        "embedding_std": float(last_epoch["embedding_std"]),
        "effective_rank": float(last_epoch["effective_rank"]),
        "rankme": pretrain["rankme"],
        "images_per_s": pretrain["images_per_s"],
        "pretrain_s": pretrain["wall_s"],
        "wall_s": round(wall, 1),
    }


def reported_k(params) -> int:
    """The k of the champion's metric (knn_k<K>_top1), else the first of eval.knn.k: one kNN column."""
    name = params.mlflow.champion_metric
    return int(name.removeprefix("knn_k").removesuffix("_top1")) if name.startswith("knn_k") else params.eval.knn.k[0]


def markdown(rows: list[dict]) -> str:
    lines = [
        "| method | lr | kNN top-1 (test) | random init | linear top-1 (test, mean over seeds) | random init "
        "| std | rank | RankMe | images/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['method']} | failed: {row['error']} |")
            continue
        percent = lambda key: f"{100 * row[key]:.2f}"  # noqa: E731
        lines.append(
            f"| {row['method']} | {row['lr']:.3g} | {percent('knn_top1')} | {percent('knn_random_init')} | "
            f"{percent('linear_top1')} | {percent('linear_random_init')} | {row['embedding_std']:.2f} | "
            f"{row['effective_rank']:.0f} | {row['rankme']:.1f} | {row['images_per_s']:,.0f} |"
        )
    return "\n".join(lines)


def rankme_agreement(rows: list[dict]) -> str:
    """How well RankMe, which needs no labels, ranks the methods as the labelled protocols do (Spearman)."""
    from scipy.stats import spearmanr

    done = [row for row in rows if "error" not in row]
    if len(done) < 3:
        return "RankMe against top-1: too few methods to rank"
    rankme = [row["rankme"] for row in done]
    linear = spearmanr(rankme, [row["linear_top1"] for row in done]).statistic
    knn = spearmanr(rankme, [row["knn_top1"] for row in done]).statistic
    return f"Spearman of RankMe with linear top-1 {linear:.2f}, with kNN top-1 {knn:.2f}, over {len(done)} methods"


def main() -> None:
    args = parse_args()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    source = f"the working tree (HEAD {commit[:10]} + changes)" if args.working_tree else f"HEAD {commit[:10]}"
    rows = []
    with tempfile.TemporaryDirectory(prefix="method-table-") as folder:
        repo = Path(folder) / "repo"
        clone(repo, args.working_tree)
        override_params(repo, args.set)
        env = stage_env(Path(folder), repo)
        for method in args.methods:
            print(f"{method}: dvc exp run ...", flush=True)
            rows.append(run_method(repo, env, method))
            print(json.dumps(rows[-1]), flush=True)
    table = markdown(rows)
    agreement = rankme_agreement(rows)
    print(f"\n{source}, params {' '.join(args.set) or 'as committed'}\n\n{table}\n\n{agreement}\n")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps({"source": source, "overrides": args.set, "rows": rows, "rankme": agreement}, indent=2) + "\n"
    )
    print(f"wrote {args.json}")
    losing = not_beating_random_init(rows)
    if args.require_beats_random_init and losing:
        raise SystemExit(f"not beating random init on both kNN and linear top-1: {', '.join(losing)}")


if __name__ == "__main__":
    main()
