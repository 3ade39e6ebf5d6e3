"""MLflow: the tracking store, lineage tags, encoder registration and the champion alias."""

from __future__ import annotations

import os
import re
import time
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
from selfsup.dotted import flatten  # noqa: E402
from selfsup.errors import TrackingError  # noqa: E402
from selfsup.reachability import unreachable  # noqa: E402

PACKAGE_DIR = Path(__file__).resolve().parent
CHAMPION, CHALLENGER = "champion", "challenger"


@dataclass(frozen=True)
class Comparison:
    """The champion a new version met: its version, its score (None when not comparable) and the score-defining
    keys that differ."""

    version: str
    score: float | None
    differs: list[str]


@dataclass(frozen=True)
class Registration:
    name: str
    version: str
    alias: str  # champion or challenger
    score: float
    champion: Comparison | None  # the champion before it; None when there was none
    model_uri: str  # models:/NAME/VERSION


def project_root(root: str | Path) -> Path:
    """The project's own folder. `dvc exp run --queue` and `--temp` run the stages in a copy of the workspace (under
    .dvc/tmp/exps) that vanishes afterwards, and name the project in DVC_ROOT: the store and its artifacts belong to
    the project, where every experiment's runs and versions meet."""
    return Path(os.environ.get("DVC_ROOT") or root).resolve()


def resolve_tracking_uri(config: MlflowConfig, root: str | Path) -> str:
    """MLFLOW_TRACKING_URI wins; a relative sqlite path is taken relative to the project's root (`project_root`)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or config.tracking_uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(project_root(root) / uri.removeprefix("sqlite:///"))
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
    with _registry_lock(uri):  # two first runs at once would both create the store's tables and the experiment
        experiment = mlflow.get_experiment_by_name(config.experiment)
        if experiment is None:
            location = (project_root(root) / "mlartifacts").as_uri() if uri.startswith("sqlite:") else None
            return mlflow.create_experiment(config.experiment, artifact_location=location)
    if experiment.lifecycle_stage == "deleted":
        raise TrackingError(
            f"MLflow experiment {config.experiment!r} is deleted: restore it (`mlflow experiments restore "
            f"--experiment-id {experiment.experiment_id}`) or set mlflow.experiment to another name"
        )
    return experiment.experiment_id


ENCODER_TAG = "encoder_sha256"  # ties every evaluation, and the registered version, to the run that trained it


@contextmanager
def pretrain_run(config: MlflowConfig, root: str | Path, *, params: dict, tags: dict[str, str]):
    """Open the MLflow run of one pretraining (its params and tags); yields its id. The run ends FINISHED, or
    FAILED when training raises. Under `dvc exp run` it is tagged with the experiment's name."""
    experiment_id = use_experiment(config, root)
    if os.environ.get("DVC_EXP_NAME"):
        tags = {**tags, "dvc_experiment": os.environ["DVC_EXP_NAME"]}
    with _mlflow_errors():
        run = mlflow.start_run(experiment_id=experiment_id, tags=tags)
        mlflow.log_params(_as_tags(params))
    try:
        yield run.info.run_id
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    mlflow.end_run("FINISHED")


@_mlflow_errors()
def log_history(run_id: str, history: list[dict]) -> None:
    """Per-epoch metrics as step metrics (step = epoch), batched."""
    rows = [(key, value, row["epoch"]) for row in history for key, value in row.items() if key != "epoch"]
    _log_metrics(run_id, rows)


def _log_metrics(run_id: str, rows: list[tuple[str, float | None, int]]) -> None:
    """(key, value, step) rows in as few calls as MLflow allows (1000 metrics each); None values are skipped."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(key, float(value), now, int(step)) for key, value, step in rows if value is not None]
    client = MlflowClient()
    for start in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[start : start + 1000])


SWEEP_TAG = "sweep"  # the sweep's folder (storage path + name): a resumed sweep finds its parent run by it
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own: the UI nests the trials under the sweep


@_mlflow_errors()
def sweep_parent_run(config: MlflowConfig, root: str | Path, sweep: str, params: dict, resume: bool) -> str:
    """The sweep's MLflow run (its params: the whole tune section and the base params); a resumed sweep
    continues the newest run of the same folder. Under `dvc exp run` it is tagged with the experiment's name."""
    experiment_id = use_experiment(config, root)
    client = MlflowClient()
    if resume:
        runs = client.search_runs(
            [experiment_id], f"tags.{SWEEP_TAG} = '{sweep}'", order_by=["attributes.start_time DESC"], max_results=1
        )
        if runs:
            client.update_run(runs[0].info.run_id, status="RUNNING")
            return runs[0].info.run_id
    tags = {"stage": "tune", SWEEP_TAG: sweep}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_experiment"] = os.environ["DVC_EXP_NAME"]
    run = client.create_run(experiment_id, tags=tags, run_name=f"sweep {Path(sweep).name}")
    flat = _as_tags(params)
    from mlflow.entities import Param

    items = [Param(key, value[:6000]) for key, value in flat.items()]
    for start in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[start : start + 100])
    return run.info.run_id


@_mlflow_errors()
def end_sweep_run(run_id: str, best: dict[str, float], artifacts: list[Path], status: str = "FINISHED") -> None:
    client = MlflowClient()
    _log_metrics(run_id, [(key, value, 0) for key, value in best.items()])
    for path in artifacts:
        client.log_artifact(run_id, str(path), artifact_path="sweep")
    client.set_terminated(run_id, status)


class TrialRuns:
    """A child run per trial under a sweep's run, found again by its trial id when a sweep resumes. Holds ids only
    (Ray Tune keeps its callbacks in the sweep's state), and writes through the tracking URI set for the sweep."""

    def __init__(self, experiment_id: str, parent_run_id: str):
        self.experiment_id, self.parent_run_id = experiment_id, parent_run_id
        self.run_ids: dict[str, str] = {}
        self.logged: dict[str, int] = {}  # the last epoch each trial's run holds

    @_mlflow_errors()
    def start(self, trial_id: str, sampled: dict) -> str:
        if trial_id in self.run_ids:
            return self.run_ids[trial_id]
        client = MlflowClient()
        found = client.search_runs(
            [self.experiment_id], f"tags.{PARENT_TAG} = '{self.parent_run_id}' and tags.trial = '{trial_id}'"
        )
        if found:  # a resumed sweep: the trial redoes the epochs after its checkpoint, which its run already holds
            run_id = found[0].info.run_id
            steps = [m.step for key in found[0].data.metrics for m in client.get_metric_history(run_id, key)]
            self.logged[trial_id] = max(steps, default=0)
        else:
            tags = {PARENT_TAG: self.parent_run_id, "trial": trial_id, "stage": "tune-trial"}
            run_id = client.create_run(self.experiment_id, tags=tags, run_name=f"trial {trial_id}").info.run_id
            from mlflow.entities import Param

            client.log_batch(run_id, params=[Param(key, str(value)) for key, value in sampled.items()])
        self.run_ids[trial_id] = run_id
        return run_id

    @_mlflow_errors()
    def log(self, trial_id: str, epochs: list[dict[str, float]]) -> None:
        """Per-epoch rows (each with its "epoch", the step), in one batch; epochs the run holds already are skipped."""
        done = self.logged.get(trial_id, 0)
        new = [row for row in epochs if row["epoch"] > done]
        rows = [(key, value, row["epoch"]) for row in new for key, value in row.items() if key != "epoch"]
        _log_metrics(self.run_ids[trial_id], rows)
        self.logged[trial_id] = max([done, *(int(row["epoch"]) for row in new)])

    @_mlflow_errors()
    def end(self, trial_id: str, status: str) -> None:
        if trial_id in self.run_ids:
            MlflowClient().set_terminated(self.run_ids[trial_id], status)


@_mlflow_errors()
def encoder_run(config: MlflowConfig, root: str | Path, encoder_sha256: str) -> str:
    """The id of the newest run that trained this encoder (found by its sha256 tag). When there is none (the
    encoder came from DVC's cache into a fresh store) a run is opened for it, so its evaluations still land."""
    experiment_id = use_experiment(config, root)
    runs = MlflowClient().search_runs(
        [experiment_id],
        f"tags.{ENCODER_TAG} = '{encoder_sha256}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if runs:
        return runs[0].info.run_id
    run = MlflowClient().create_run(
        experiment_id, tags={ENCODER_TAG: encoder_sha256, "note": "encoder from DVC's cache"}
    )
    MlflowClient().set_terminated(run.info.run_id)
    return run.info.run_id


@_mlflow_errors()
def log_evaluation(
    config: MlflowConfig, root: str | Path, encoder_sha256: str, metrics: dict[str, float], artifacts: list[Path]
) -> str:
    """Add an evaluation's metrics and pictures to the run that trained the encoder; returns the run id."""
    run_id = encoder_run(config, root, encoder_sha256)
    _log_metrics(run_id, [(key, value, 0) for key, value in metrics.items()])
    client = MlflowClient()
    for path in artifacts:
        client.log_artifact(run_id, str(path), artifact_path="pictures")
    return run_id


def serving_requirements() -> list[str]:
    """The registered model's pip requirements: what loading it and `predict` import (selfsup.serving, the backbones,
    selfsup.config), pinned to the versions installed here. `selfsup` itself travels with the model (code_paths),
    so its other dependencies (Ray, DVC...) are not needed where it is served."""
    from importlib.metadata import version

    return [
        f"{name}=={installed.split('+')[0]}"  # 2.14.1+cpu -> 2.14.1: the server's index picks its CPU or CUDA build
        for name, installed in [
            ("torch", torch.__version__),
            ("torchvision", version("torchvision")),  # every backbone but small_cnn (not imported here: seconds)
            ("numpy", np.__version__),
            ("pydantic", version("pydantic")),  # selfsup.config, which the backbones import
            ("mlflow", mlflow.__version__),
        ]
    ]


def encoder_signature(feature_dim: int) -> ModelSignature:
    """uint8 N x H x W x 3 in (the form of the input example), float32 N x feature_dim out.

    `predict` takes more than that and checks its input itself (selfsup.serving.as_images: floats in [0, 1], gray,
    lists of differently sized images), so the signature is marked as MLflow marks one inferred from type hints:
    MLflow then enforces no schema before predict, and its scoring server hands predict a request's `inputs` as
    they are, where it would make one array of them (which a list of differently sized images cannot be).
    """
    # Unnamed tensors: a named input spec would reach predict as a dict, not the array users pass.
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, feature_dim))]),
    )
    signature._is_signature_from_type_hint = True  # MLflow 3.x's own flag (see above); tests/unit/test_serving.py
    return signature


@_mlflow_errors()
def register_encoder(
    encoder_path: str | Path,
    config: MlflowConfig,
    root: str | Path,
    *,
    params: dict,
    metrics: dict[str, float],
    champion_metric: str,
    lineage: dict[str, str],
    example: np.ndarray,
    feature_dim: int,
    pictures: list[Path] = (),
) -> Registration:
    """Log the encoder as a pyfunc model into the run that trained it, with every protocol's metrics and
    pictures (evaluations that DVC skipped as up to date logged nothing), register a version, set its alias.

    The version becomes `champion` only if there is none, or if `metrics[champion_metric]` (a validation score:
    nothing is chosen on test) beats the champion's on the same data and protocol; otherwise it is the `challenger`.
    """
    from selfsup.data.arrays import file_sha256

    run_id = encoder_run(config, root, file_sha256(encoder_path))
    signature = encoder_signature(feature_dim)
    flat_params = _as_tags(params)
    with mlflow.start_run(run_id=run_id) as run:
        logged = run.data.metrics  # what the evaluations logged already: only those DVC skipped are missing
        mlflow.log_metrics({key: value for key, value in metrics.items() if logged.get(key) != value})
        mlflow.set_tags(lineage)
        for path in pictures:
            mlflow.log_artifact(str(path), artifact_path="pictures")
        info = mlflow.pyfunc.log_model(
            name="encoder",
            python_model=str(PACKAGE_DIR / "serving.py"),
            artifacts={"encoder": str(encoder_path)},
            code_paths=[str(PACKAGE_DIR)],
            signature=signature,
            input_example=example,
            pip_requirements=serving_requirements(),
        )
    param_tags = {f"params.{k}": v for k, v in flat_params.items()}
    tags = {
        **lineage,
        **param_tags,
        **{f"metrics.{k}": f"{v:.6f}" for k, v in metrics.items()},
        "run_id": run.info.run_id,
    }
    # The version's tags in the call that creates it: one write, where a tag at a time took seconds.
    version = str(mlflow.register_model(info.model_uri, config.model_name, tags=tags).version)
    score = metrics[champion_metric]
    with _registry_lock(resolve_tracking_uri(config, root)):  # decide on the champion as it is now, then set
        alias, champion = _choose_alias(MlflowClient(), config.model_name, tags, score, champion_metric)
        MlflowClient().set_registered_model_alias(config.model_name, alias, version)
    return Registration(config.model_name, version, alias, score, champion, f"models:/{config.model_name}/{version}")


# What a champion metric's value depends on besides the encoder, as version tags: the data it is measured on (every
# split's hash) and the keys of its protocol (knn's k is in the metric's name). RankMe is measured on the pretraining
# data's held-out images, the labelled protocols on the evaluation data.
SCORE_DEPENDS_ON = {"knn": ("params.eval.knn.temperature",), "linear": ("params.eval.linear.", "params.eval.seeds")}


def score_definition(tags: dict[str, str], metric: str) -> dict[str, str | None]:
    """The tags of a version that must be equal for its `metric` to be comparable with another version's."""
    protocol = metric.split(".")[0]
    prefixes = SCORE_DEPENDS_ON.get(protocol, ())
    keys = {key for key in tags if key.startswith(prefixes)} | {p for p in prefixes if not p.endswith(".")}
    # Versions registered before eval.data existed were evaluated on their pretraining data.
    data = "dataset_sha256" if protocol == "pretrain" else "eval_dataset_sha256"
    return {data: tags.get(data, tags.get("dataset_sha256")), **{key: tags.get(key) for key in sorted(keys)}}


def _choose_alias(
    client: MlflowClient, name: str, tags: dict[str, str], score: float, metric: str
) -> tuple[str, Comparison | None]:
    """`champion` when there is none or the new score beats the champion's on the same definition; else
    `challenger` (a worse score, or one that cannot be compared: promoting it is the user's call)."""
    aliases = client.get_registered_model(name).aliases  # the model exists: we just registered
    if CHAMPION not in aliases:
        return CHAMPION, None
    champion = client.get_model_version(name, aliases[CHAMPION])
    theirs, ours = score_definition(champion.tags, metric), score_definition(tags, metric)
    differs = [key.removeprefix("params.") for key in ours if theirs.get(key) != ours[key]]
    # Its score as registered (a tag), not its run's metric, which a later evaluation of the same encoder rewrites.
    registered = champion.tags.get(f"metrics.{metric}")
    champion_score = None if differs or registered is None else float(registered)
    comparison = Comparison(str(champion.version), champion_score, differs)
    if champion_score is not None and score > champion_score:
        return CHAMPION, comparison
    return CHALLENGER, comparison


@contextmanager
def _registry_lock(uri: str):
    """Serialise the champion's read-compare-set (and a store's creation) among processes using one local store
    (two `dvc exp run`s at once): an exclusive lock on a file beside the SQLite database. A server store has no
    file to lock; there the champion is read just before the alias is set."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    with open(uri.removeprefix("sqlite:///") + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@_mlflow_errors()
def promote(config: MlflowConfig, root: str | Path, version: str) -> str | None:
    """Make `version` the champion, whatever its score (the explicit act a non-comparable challenger needs);
    returns the version it replaces."""
    from selfsup.errors import TrackingError

    use_experiment(config, root)
    client = MlflowClient()
    versions = {str(v.version) for v in client.search_model_versions(f"name = '{config.model_name}'")}
    if str(version) not in versions:
        listed = ", ".join(sorted(versions, key=int)) or "none"
        raise TrackingError(f"{config.model_name} has no version {version} (versions: {listed})")
    with _registry_lock(resolve_tracking_uri(config, root)):
        aliases = {alias: str(v) for alias, v in client.get_registered_model(config.model_name).aliases.items()}
        client.set_registered_model_alias(config.model_name, CHAMPION, str(version))
        if aliases.get(CHALLENGER) == str(version):
            client.delete_registered_model_alias(config.model_name, CHALLENGER)
    return aliases.get(CHAMPION)


@dataclass(frozen=True)
class ModelVersionRef:
    """One registered version, pinned: a consumer reads it even when an alias moves while it runs."""

    name: str
    version: str

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


MODEL_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))")


def resolve_model(model_uri: str, tracking_uri: str) -> ModelVersionRef:
    """models:/NAME@ALIAS or models:/NAME/VERSION -> the version it names now; one line when the store, the model,
    the alias or the version is missing."""
    match = MODEL_URI.fullmatch(model_uri)
    if not match:
        raise TrackingError(f"model {model_uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).is_file():
        raise TrackingError(
            f"no MLflow store at {tracking_uri}: run `dvc repro` to register an encoder, or set MLFLOW_TRACKING_URI"
        )
    check_reachable(tracking_uri)
    client = MlflowClient(tracking_uri)
    name, alias, version = match["name"], match["alias"], match["version"]
    try:
        registered = client.get_registered_model(name)
    except MlflowException:
        raise TrackingError(f"no registered model {name!r} in {tracking_uri}: check the name") from None
    if alias:
        if alias not in registered.aliases:
            known = ", ".join(f"{a} (version {v})" for a, v in sorted(registered.aliases.items())) or "none"
            raise TrackingError(f"{name} has no alias {alias!r}; its aliases: {known}")
        return ModelVersionRef(name, str(registered.aliases[alias]))
    versions = {str(v.version) for v in client.search_model_versions(f"name = '{name}'")}
    if version not in versions:
        listed = ", ".join(sorted(versions, key=int)) or "none"
        raise TrackingError(f"{name} has no version {version}; its versions: {listed}")
    return ModelVersionRef(name, version)


def _as_tags(tree: dict) -> dict[str, str]:
    return {key: str(value) for key, value in flatten(tree).items()}
