"""Stage `register`: log the encoder to MLflow, register a version, move `champion` only if it is better."""

import json
import subprocess
from dataclasses import asdict

from pipelines.common import ENCODER, METRICS, PREPARED, ROOT, read_params, run_stage, write_json
from selfsup.data.arrays import Manifest, load_split
from selfsup.models import load_encoder


def main() -> None:
    params = read_params()
    from selfsup.tracking import register_encoder

    knn = json.loads((METRICS / "eval_knn.json").read_text())
    linear = json.loads((METRICS / "eval_linear.json").read_text())
    manifest = Manifest.read(PREPARED)
    encoder, _ = load_encoder(ENCODER)
    registration = register_encoder(
        ENCODER,
        params.mlflow,
        ROOT,
        params=params.model_dump(mode="json"),
        metrics={
            "knn_top1": knn["top1"],
            "knn_baseline_top1": knn["baseline_top1"],
            "linear_top1": linear["top1"],
            "linear_baseline_top1": linear["baseline_top1"],
        },
        lineage={"git_commit": _git_commit(), "dataset_sha256": manifest.sha256, "dataset_source": manifest.source},
        example=load_split(PREPARED, "test").images[:2],
        feature_dim=encoder.feature_dim,
    )
    write_json(ROOT / "models" / "registration.json", asdict(registration))
    previous = registration.previous_champion_score
    versus = f" (champion had {previous:.2%})" if previous is not None else " (no comparable champion before it)"
    print(
        f"registered {registration.name} version {registration.version} as @{registration.alias}: "
        f"{params.mlflow.champion_metric} {registration.score:.2%}{versus}"
    )


def _git_commit() -> str:
    """HEAD's commit, marked `-dirty` when tracked files differ from it."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "HEAD") or "unknown"
    return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


if __name__ == "__main__":
    run_stage(main)
