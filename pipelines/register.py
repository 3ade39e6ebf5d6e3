"""Stage `register`: log the encoder to MLflow, register a version, move `champion` only if it is better."""

import json
import subprocess
from dataclasses import asdict

from pipelines.common import (
    ENCODER,
    METRICS,
    PLOTS,
    PREPARED,
    ROOT,
    champion_metric_key,
    evaluation_data,
    read_params,
    run_stage,
    write_json,
)
from selfsup.data.arrays import Manifest, load_split
from selfsup.eval.protocol import metric_values
from selfsup.models import load_encoder

PROTOCOLS = ("knn", "linear", "semisup", "transfer")
PICTURES = ("pretrain.png", "retrieval.png", "embedding_map.png", "confusion.png", "label_fraction.png")


def main() -> None:
    params = read_params()
    from selfsup.tracking import register_encoder

    # Every protocol's numbers land in the registered run; the champion is chosen on a validation score.
    metrics = {}
    for protocol in PROTOCOLS:
        metrics.update(metric_values(json.loads((METRICS / f"eval_{protocol}.json").read_text()), protocol + "."))
    metrics.update(metric_values(json.loads((METRICS / "pretrain.json").read_text()), "pretrain."))  # RankMe
    champion_metric = champion_metric_key(params.mlflow.champion_metric)
    manifest = Manifest.read(PREPARED)
    encoder, _ = load_encoder(ENCODER)
    registration = register_encoder(
        ENCODER,
        params.mlflow,
        ROOT,
        params=params.model_dump(mode="json"),
        metrics=metrics,
        champion_metric=champion_metric,
        lineage={
            "git_commit": _git_commit(),
            "dataset_sha256": manifest.sha256,
            "dataset_source": manifest.source,
            "eval_dataset_sha256": Manifest.read(evaluation_data()).sha256,  # what the labelled scores were made on
        },
        example=load_split(PREPARED, "test" if "test" in manifest.splits else "val").images[:2],
        feature_dim=encoder.feature_dim,
        pictures=[PLOTS / name for name in PICTURES],
    )
    write_json(ROOT / "models" / "registration.json", asdict(registration))
    print(
        f"registered {registration.name} version {registration.version} as @{registration.alias}: "
        f"{champion_metric} {_shown(champion_metric, registration.score)}{_versus(registration, champion_metric)}"
    )


def _shown(metric: str, score: float) -> str:
    """An accuracy as a percentage; RankMe (an effective number of dimensions) as it is."""
    return f"{score:.2f}" if metric == "pretrain.rankme" else f"{score:.2%}"


def _versus(registration, metric: str) -> str:
    champion = registration.champion
    if champion is None:
        return " (no champion before it)"
    if champion.score is None:
        return (
            f"; not comparable with champion version {champion.version} (they differ in {', '.join(champion.differs)}):"
            f" `python -m pipelines.promote {registration.version}` makes it the champion"
        )
    return f" (champion version {champion.version} had {_shown(metric, champion.score)})"


# The code a commit stands for. Not params.yaml (its values are tagged one by one, and `dvc exp run -S` edits it),
# nor what `dvc repro` itself rewrites (dvc.lock, metrics/, plots/).
SOURCE = ("ssl", "pipelines", "dvc.yaml", "pyproject.toml")


def _git_commit() -> str:
    """HEAD's commit, marked `-dirty` when the source files differ from it."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "HEAD") or "unknown"
    return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no", "--", *SOURCE) else "")


if __name__ == "__main__":
    run_stage(main)
