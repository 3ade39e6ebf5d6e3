"""MLflow: the tracking store, lineage tags, encoder registration and the champion alias."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# Quiet and offline by default; a user's own settings win.
for _key, _value in {
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}.items():
    os.environ.setdefault(_key, _value)

import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.models import ModelSignature  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from mlflow.types import Schema, TensorSpec  # noqa: E402

from selfsup.config import MlflowConfig  # noqa: E402
from selfsup.errors import TrackingError  # noqa: E402
from selfsup.reachability import unreachable  # noqa: E402

PACKAGE_DIR = Path(__file__).resolve().parent
CHAMPION, CHALLENGER = "champion", "challenger"


@dataclass(frozen=True)
class Registration:
    name: str
    version: str
    alias: str  # champion or challenger
    score: float
    previous_champion_score: float | None
    model_uri: str  # models:/NAME/VERSION


def resolve_tracking_uri(config: MlflowConfig, root: str | Path) -> str:
    """MLFLOW_TRACKING_URI wins; a relative sqlite path is taken relative to `root` (the repo)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or config.tracking_uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str((Path(root) / uri.removeprefix("sqlite:///")).resolve())
    return uri


def check_reachable(uri: str) -> None:
    if not uri.startswith(("http://", "https://")):
        return
    problem = unreachable(uri, default_port=443 if uri.startswith("https") else 80)
    if problem:
        raise TrackingError(
            f"the MLflow server at {uri} is unreachable ({problem}): start it (`mlflow server --host "
            "127.0.0.1`), fix MLFLOW_TRACKING_URI, or unset it to use the local SQLite store"
        ) from None


@contextmanager
def _mlflow_errors():
    """MLflow's own refusals (a bad URI or name, a store it cannot write) as one clear line."""
    try:
        yield
    except MlflowException as error:
        raise TrackingError(f"MLflow refused: {error.message}") from None


@_mlflow_errors()
def use_experiment(config: MlflowConfig, root: str | Path) -> str:
    """Point MLflow at the store and experiment; returns the experiment id.

    A local store keeps artifacts in `<root>/mlartifacts`, set explicitly when the experiment is made:
    MLflow would otherwise record a path relative to wherever the first run happened.
    """
    uri = resolve_tracking_uri(config, root)
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(config.experiment)
    if experiment is not None and experiment.lifecycle_stage == "deleted":
        raise TrackingError(
            f"MLflow experiment {config.experiment!r} is deleted: restore it (`mlflow experiments restore "
            f"--experiment-id {experiment.experiment_id}`) or set mlflow.experiment to another name"
        )
    if experiment is not None:
        return experiment.experiment_id
    location = (Path(root) / "mlartifacts").resolve().as_uri() if uri.startswith("sqlite:") else None
    return mlflow.create_experiment(config.experiment, artifact_location=location)


@_mlflow_errors()
def register_encoder(
    encoder_path: str | Path,
    config: MlflowConfig,
    root: str | Path,
    *,
    params: dict,
    metrics: dict[str, float],
    lineage: dict[str, str],
    example: np.ndarray,
    feature_dim: int,
) -> Registration:
    """Log the encoder as a pyfunc model, register a version, and set its alias.

    The version becomes `champion` only if its `config.champion_metric` beats the current champion's;
    otherwise it is the `challenger`.
    """
    experiment_id = use_experiment(config, root)
    # Unnamed tensors: a named input spec would reach predict as a dict, not the array users pass.
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, feature_dim))]),
    )
    flat_params = _flatten(params)
    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.log_params(flat_params)
        mlflow.log_metrics(metrics)
        mlflow.set_tags(lineage)
        info = mlflow.pyfunc.log_model(
            name="encoder",
            python_model=str(PACKAGE_DIR / "serving.py"),
            artifacts={"encoder": str(encoder_path)},
            code_paths=[str(PACKAGE_DIR)],
            signature=signature,
            input_example=example,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy", f"mlflow=={mlflow.__version__}"],
            registered_model_name=config.model_name,
        )
    client = MlflowClient()
    version = str(info.registered_model_version)
    score = metrics[config.champion_metric]
    param_tags = {f"params.{k}": v for k, v in flat_params.items()}
    # What decides what a score means: the data and how it is evaluated.
    comparable = {
        "dataset_sha256": lineage["dataset_sha256"],
        **{k: v for k, v in param_tags.items() if k.startswith(("params.data.", "params.eval."))},
    }
    champion_score = _champion_score(client, config, comparable)
    alias = CHAMPION if champion_score is None or score > champion_score else CHALLENGER
    client.set_registered_model_alias(config.model_name, alias, version)
    tags = {
        **lineage,
        **param_tags,
        **{f"metrics.{k}": f"{v:.6f}" for k, v in metrics.items()},
        "run_id": run.info.run_id,
    }
    for key, value in tags.items():
        client.set_model_version_tag(config.model_name, version, key, value)
    return Registration(
        config.model_name, version, alias, score, champion_score, f"models:/{config.model_name}/{version}"
    )


def _champion_score(client: MlflowClient, config: MlflowConfig, comparable: dict[str, str]) -> float | None:
    """The champion's score, or None when there is none or its score means something else.

    A champion evaluated on other data, or by another protocol, cannot be beaten or kept on a number
    that is not comparable: the new version starts a new line of champions.
    """
    aliases = client.get_registered_model(config.model_name).aliases  # the model exists: we just registered
    if CHAMPION not in aliases:
        return None
    champion = client.get_model_version(config.model_name, aliases[CHAMPION])
    if any(champion.tags.get(key) != value for key, value in comparable.items()):
        return None
    return client.get_run(champion.run_id).data.metrics.get(config.champion_metric)


def _flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat
