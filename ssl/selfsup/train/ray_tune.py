"""Sweeps through Ray Tune: each trial runs the pretraining loop (`train_loop`) through a `Session` that reports to
Tune, on a local Ray instance or the cluster at RAY_ADDRESS.

A trial is one process holding its own share of the machine (`tune.cpus_per_trial`, a fraction of a GPU), so
small trials run side by side; ASHA stops the poor ones at its rungs. The sweep's folder (storage path + name)
holds Tune's state: a driver killed midway continues with `resume=True`, without re-running finished trials.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np

for _key, _value in {
    # Tune saves the sweep's state (what --resume reads) at most this often; Ray's "auto" can wait minutes,
    # so a killed driver would re-run trials that had finished. Small sweeps save in milliseconds.
    "TUNE_GLOBAL_CHECKPOINT_S": "2",
    # ... and warns when saving takes long beside short trials, which small trials make expected.
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
}.items():
    os.environ.setdefault(_key, _value)

import ray  # noqa: E402
from ray import tune  # noqa: E402
from ray.tune.schedulers import ASHAScheduler  # noqa: E402

from selfsup.config import TuneConfig  # noqa: E402
from selfsup.data.arrays import Manifest  # noqa: E402
from selfsup.errors import ConfigError  # noqa: E402
from selfsup.params import Params  # noqa: E402
from selfsup.sweep import PROBED, TrialResult, trial_params  # noqa: E402
from selfsup.train.loop import PretrainSpec, train_loop  # noqa: E402
from selfsup.train.monitor import KnnMonitor  # noqa: E402
from selfsup.train.ray_trainer import CheckpointsThroughRay, connect_ray, quiet_ray_train_worker  # noqa: E402

# Per epoch, to each trial's MLflow run.
CURVES = ("loss", "lr", "images_per_s", "embedding_std", "effective_rank", "monitor_knn_top1", "monitor_linear_top1")


class TuneSession(CheckpointsThroughRay):
    """The loop's `Session` in a Tune trial: one process, checkpoints and metrics through Ray Tune."""

    rank, world_size = 0, 1

    def __init__(self, device):
        super().__init__(tune)
        self.device = device

    def report(self, metrics: dict, checkpoint: dict | None) -> None:
        # Which node ran it: on a cluster whose nodes share an address (or a laptop's), the IP cannot tell.
        super().report({**metrics, "node_id": ray.get_runtime_context().get_node_id()}, checkpoint)


def _trial(sampled: dict[str, Any], *, base: dict, manifest: Manifest, images: np.ndarray, monitor: KnnMonitor):
    """One trial, in its own Ray worker process: the pipeline's params with the sampled values, the one loop."""
    import logging

    import torch

    from selfsup.params import load_params

    quiet_ray_train_worker()
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)  # a line per checkpoint otherwise
    params = trial_params(load_params(base), sampled)
    cpus = tune.get_context().get_trial_resources().required_resources.get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))
    device = torch.device("cuda" if params.tune.gpus_per_trial and torch.cuda.is_available() else "cpu")
    if params.tune.metric == PROBED:  # the trial's own eval.linear, which the sweep may have sampled
        monitor = dataclasses.replace(monitor, linear=params.eval.linear)
    spec = PretrainSpec.from_params(params, manifest)
    train_loop(images, spec, TuneSession(device), monitor, monitor.train_labels)


def search_space(config: TuneConfig) -> dict[str, Any]:
    """params.yaml's distributions as Tune's, under the same dotted names."""
    build = {"loguniform": tune.loguniform, "uniform": tune.uniform}
    space = {}
    for key, distribution in config.space.items():
        ((kind, values),) = distribution.items()
        space[key] = tune.choice(values) if kind == "choice" else build[kind](*values)
    return space


def _search_algorithm(config: TuneConfig):
    if config.search == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(random_state=config.seed)  # Tune's own: num_samples independent draws
    try:
        import optuna  # noqa: F401
        from ray.tune.search.optuna import OptunaSearch
    except ImportError:
        raise ConfigError(
            'params.yaml: tune.search=optuna needs Optuna: pip install -e ".[optuna]", or set tune.search: random'
        ) from None
    return OptunaSearch(seed=config.seed)


def _check_trial_fits(config: TuneConfig) -> None:
    """A trial asking more than any node has would wait forever: refuse it before the sweep starts."""
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    for resource, asked, key in (("CPU", config.cpus_per_trial, "cpus"), ("GPU", config.gpus_per_trial, "gpus")):
        largest = max((node.get(resource, 0) for node in nodes), default=0)
        if asked > largest:
            raise ConfigError(
                f"params.yaml: tune.{key}_per_trial={asked:g} exceeds the largest Ray node's {largest:g} {resource}; "
                f"allowed: at most {largest:g}"
            )


def run_sweep(
    params: Params,
    manifest: Manifest,
    images: np.ndarray,
    monitor: KnnMonitor,
    storage_path: str,
    callbacks: list[tune.Callback],
    resume: bool = False,
) -> list[TrialResult]:
    """Run (or with `resume`, continue) the sweep `params.tune` describes; returns every trial's result."""
    config = params.tune
    connect_ray()  # an unreachable RAY_ADDRESS fails here, within seconds
    _check_trial_fits(config)
    trainable = tune.with_resources(
        tune.with_parameters(
            _trial, base=params.model_dump(mode="json"), manifest=manifest, images=images, monitor=monitor
        ),
        {"cpu": config.cpus_per_trial, "gpu": config.gpus_per_trial},
    )
    path = sweep_path(storage_path, config.name)
    if resume:
        if not tune.Tuner.can_restore(path):
            raise ConfigError(f"no sweep to resume at {path}: run `python -m pipelines.tune` without --resume")
        tuner = tune.Tuner.restore(path, trainable)
    else:
        scheduler = None
        if config.asha is not None:
            scheduler = ASHAScheduler(
                time_attr="epoch",
                max_t=config.epochs,
                grace_period=min(config.asha.grace_period, config.epochs),
                reduction_factor=config.asha.reduction_factor,
            )
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(config),
            tune_config=tune.TuneConfig(
                metric=config.metric,
                mode=config.resolved_mode,
                num_samples=config.num_samples,
                scheduler=scheduler,
                search_alg=_search_algorithm(config),
                max_concurrent_trials=config.max_concurrent_trials,
            ),
            run_config=tune.RunConfig(
                name=config.name,
                storage_path=storage_path,
                callbacks=callbacks,
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                verbose=1,
            ),
        )
    grid = tuner.fit()
    return [_trial_result(result, config) for result in grid]


def sweep_path(storage_path: str, name: str) -> str:
    return f"{storage_path.rstrip('/')}/{name}"


def _trial_result(result: tune.Result, config: TuneConfig) -> TrialResult:
    metrics = result.metrics or {}
    epochs = int(metrics.get("epoch", 0))
    if result.error is not None:
        status = "error: " + (str(result.error).strip().splitlines() or ["?"])[-1][:200]
    elif epochs < config.epochs:
        status = "stopped early"
    else:
        status = "completed"
    value = metrics.get(config.metric)
    return TrialResult(
        trial_id=metrics.get("trial_id") or Path(result.path).name,
        values={key: result.config[key] for key in config.space},
        metric=None if value is None else float(value),
        epochs=epochs,
        status=status,
    )


class MlflowTrials(tune.Callback):
    """One MLflow child run per trial under the sweep's parent run: its sampled params and per-epoch curves.

    It runs in the driver, so a single process writes to the tracking store however many trials run at once.
    """

    def __init__(self, runs):  # selfsup.tracking.TrialRuns
        self.runs = runs

    def on_trial_start(self, iteration, trials, trial, **info):
        self.runs.start(trial.trial_id, trial.config)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        curves = {key: result[key] for key in CURVES if key in result}
        self.runs.log(trial.trial_id, curves, step=int(result["epoch"]))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.runs.end(trial.trial_id, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.runs.end(trial.trial_id, "FAILED")
