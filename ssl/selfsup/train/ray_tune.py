"""Sweeps through Ray Tune: each trial runs the pretraining loop (`train_loop`) through a `Session` that reports to
Tune, on a local Ray instance or the cluster at RAY_ADDRESS.

A trial is one process holding its own share of the machine (`tune.cpus_per_trial`, a fraction of a GPU), so
small trials run side by side, at most `tune.max_concurrent_trials` at once; ASHA stops the poor ones at its rungs,
deciding in the trials' creation order (`OrderedAsha`), so that a seeded sweep picks the same winner every time.
The sweep's folder (storage path + name) holds Tune's state: a driver killed midway continues with `resume=True`,
without re-running finished trials.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray import tune
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from selfsup.config import TuneConfig
from selfsup.data.arrays import Manifest
from selfsup.errors import ConfigError
from selfsup.params import Params
from selfsup.sweep import (
    PROBED,
    RungTrial,
    TrialResult,
    asha_rungs,
    ordered_asha,
    sweep_path,
    trial_params,
)
from selfsup.train.loop import PretrainSpec, train_loop
from selfsup.train.monitor import Monitor
from selfsup.train.ray_trainer import CheckpointsThroughRay, connect_ray, quiet_ray_train_worker

TUNE_SETTINGS = {
    # Tune saves the sweep's state (what --resume reads) at most this often; Ray's "auto" can wait minutes,
    # so a killed driver would re-run trials that had finished. Small sweeps save in milliseconds.
    "TUNE_GLOBAL_CHECKPOINT_S": "2",
    # ... and warns when saving takes long beside short trials, which small trials make expected.
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
}

# Per epoch, to each trial's MLflow run.
CURVES = (
    "loss",
    "lr",
    "images_per_s",
    "embedding_std",
    "effective_rank",
    "monitor_knn_top1",
    "monitor_linear_top1",
    "monitor_rankme",
)


class TuneSession(CheckpointsThroughRay):
    """The loop's `Session` in a Tune trial: one process, checkpoints and metrics through Ray Tune.

    The loop reports at checkpoints only (each report waits on Ray); each report carries, as `history`, every epoch
    since the previous one (from the checkpoint's history), so the trial's MLflow run gets every epoch's curves.
    """

    rank, world_size = 0, 1

    def __init__(self, device):
        super().__init__(tune)
        self.device = device
        self.started_at = time.time()
        self._reported_epoch = 0  # of the previous report, or of the checkpoint the trial resumed from

    def latest_checkpoint(self) -> dict | None:
        state = super().latest_checkpoint()
        self._reported_epoch = state["epoch"] if state else 0
        return state

    def report(self, metrics: dict, checkpoint: dict | None) -> None:
        epochs = [row for row in (checkpoint or {}).get("history", [metrics]) if row["epoch"] > self._reported_epoch]
        self._reported_epoch = metrics["epoch"]
        extra = {
            # Which node ran it: on a cluster whose nodes share an address (or a laptop's), the IP cannot tell.
            "node_id": ray.get_runtime_context().get_node_id(),
            # A string, not a list of rows: Tune's loggers (TensorBoard's, the CSV) take no lists of mappings.
            "history": json.dumps(epochs, default=float),
            "started_at": self.started_at,  # when this trial's process began, and this report (time.time())
            "reported_at": time.time(),
        }
        super().report({**metrics, **extra}, checkpoint)


def _trial(
    sampled: dict[str, Any],
    *,
    base: dict,
    manifest: Manifest,
    images: np.ndarray,
    labels: np.ndarray | None,
    monitor: Monitor,
):
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
        monitor = dataclasses.replace(monitor, probe=dataclasses.replace(monitor.probe, linear=params.eval.linear))
    spec = PretrainSpec.from_params(params, manifest)
    train_loop(images, spec, TuneSession(device), monitor, labels)


def search_space(config: TuneConfig) -> dict[str, Any]:
    """params.yaml's distributions as Tune's, under the same dotted names."""
    build = {"loguniform": tune.loguniform, "uniform": tune.uniform}
    space = {}
    for key, distribution in config.space.items():
        ((kind, values),) = distribution.items()
        space[key] = tune.choice(values) if kind == "choice" else build[kind](*values)
    return space


def search_algorithm(config: TuneConfig):
    """The search, holding tune.max_concurrent_trials itself: Tune's own `max_concurrent_trials` ignores it for
    the random search (a SearchGenerator, not a Searcher: "requires a Searcher instance")."""
    limit = config.max_concurrent_trials or 0
    if config.search == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        # Tune's own: num_samples independent draws, created at most `limit` unfinished at a time
        return BasicVariantGenerator(random_state=config.seed, max_concurrent=limit)
    try:
        import optuna  # noqa: F401
        from ray.tune.search.optuna import OptunaSearch
    except ImportError:
        raise ConfigError(
            'params.yaml: tune.search=optuna needs Optuna: pip install -e ".[optuna]", or set tune.search: random'
        ) from None
    from ray.tune.search import ConcurrencyLimiter

    searcher = OptunaSearch(seed=config.seed)
    return ConcurrencyLimiter(searcher, max_concurrent=limit) if limit else searcher


def scheduler(config: TuneConfig) -> TrialScheduler:
    grace_period = min(config.asha.grace_period, config.epochs)
    if config.scheduler == "asha":
        return OrderedAsha(config.epochs, grace_period, config.asha.reduction_factor)
    if config.scheduler == "async_asha":
        return ASHAScheduler(
            time_attr="epoch",
            max_t=config.epochs,
            grace_period=grace_period,
            reduction_factor=config.asha.reduction_factor,
        )
    return FIFOScheduler()


class OrderedAsha(FIFOScheduler):
    """tune.scheduler: asha. ASHA decided as `selfsup.sweep.ordered_asha` does: as if the trials had run one after
    another in the order they were created, so the same seed stops the same trials, whatever order reports come in.

    A trial whose decision waits on an earlier trial's report at the same rung goes on meanwhile and, if it is to
    stop, stops at its next report: `run_sweep` then reads its results at the report it stopped at.
    """

    def __init__(self, epochs: int, grace_period: int, reduction_factor: float):
        super().__init__()
        self.epochs, self.reduction_factor = epochs, reduction_factor
        self.rungs = asha_rungs(epochs, grace_period, reduction_factor)
        self.trials: dict[str, RungTrial] = {}  # in creation order
        self._mode = "max"

    def set_search_properties(self, metric: str | None, mode: str | None, **spec) -> bool:
        self._metric, self._mode = metric or self._metric, mode or self._mode
        return True

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        if trial.trial_id not in self.trials:
            ended = trial.status in (Trial.TERMINATED, Trial.ERROR)
            reports = _restored_reports(trial, self._metric) if trial.has_reported_at_least_once else []
            self.trials[trial.trial_id] = RungTrial(reports or [], ended, unknown=reports is None)

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        if self._metric not in result or "epoch" not in result:
            return TrialScheduler.CONTINUE
        reports = self.trials[trial.trial_id].reports
        if not reports or result["epoch"] > reports[-1][0]:  # a resumed trial redoes the epochs after its checkpoint
            reports.append((float(result["epoch"]), float(result[self._metric])))
        return TrialScheduler.STOP if isinstance(self.decision(trial.trial_id), int) else TrialScheduler.CONTINUE

    def decision(self, trial_id: str) -> int | str | None:
        decisions = ordered_asha(list(self.trials.values()), self.rungs, self.reduction_factor, self._mode, self.epochs)
        return decisions[list(self.trials).index(trial_id)]

    def _ended(self, trial: Trial) -> None:
        if trial.trial_id in self.trials:
            self.trials[trial.trial_id].ended = True

    def on_trial_complete(self, tune_controller, trial: Trial, result: dict) -> None:
        self._ended(trial)

    def on_trial_error(self, tune_controller, trial: Trial) -> None:
        self._ended(trial)

    def on_trial_remove(self, tune_controller, trial: Trial) -> None:
        self._ended(trial)

    def debug_string(self) -> str:
        return f"Using ASHA in trial order: rungs at epochs {', '.join(f'{r:g}' for r in self.rungs)}."


def _restored_reports(trial: Trial, metric: str) -> list[tuple[float, float]] | None:
    """A resumed sweep's trial's reports so far, from its result.json; None when they cannot be read."""
    try:
        with trial.storage.storage_filesystem.open_input_stream(f"{trial.path}/result.json") as stream:
            lines = stream.read().decode().splitlines()
        rows = [json.loads(line) for line in lines if line.strip()]
        return [(epoch, float(row[metric])) for epoch, row in _reports(rows, metric)]
    except Exception:  # any storage, any damage: the scheduler then waits on this trial, never guesses
        return None


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
    labels: np.ndarray | None,
    monitor: Monitor,
    storage_path: str,
    callbacks: list[tune.Callback],
    resume: bool = False,
) -> list[TrialResult]:
    """Run (or with `resume`, continue) the sweep `params.tune` describes; returns every trial's result."""
    config = params.tune
    connect_ray()  # an unreachable RAY_ADDRESS fails here, within seconds
    for key, value in TUNE_SETTINGS.items():  # read by Tune's controller when the Tuner runs; a user's own win
        os.environ.setdefault(key, value)
    _check_trial_fits(config)
    trainable = tune.with_resources(
        tune.with_parameters(
            _trial,
            base=params.model_dump(mode="json"),
            manifest=manifest,
            images=images,
            labels=labels,
            monitor=monitor,
        ),
        {"cpu": config.cpus_per_trial, "gpu": config.gpus_per_trial},
    )
    path = sweep_path(storage_path, config.name)
    if resume:
        if not tune.Tuner.can_restore(path):
            raise ConfigError(f"no sweep to resume at {path}: run `python -m pipelines.tune` without --resume")
        tuner = tune.Tuner.restore(path, trainable)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(config),
            tune_config=tune.TuneConfig(
                metric=config.metric,
                mode=config.resolved_mode,
                num_samples=config.num_samples,
                scheduler=scheduler(config),
                search_alg=search_algorithm(config),  # holds max_concurrent_trials
            ),
            run_config=tune.RunConfig(
                name=config.name,
                storage_path=storage_path,
                callbacks=callbacks,
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                verbose=1,
            ),
        )
    results = list(tuner.fit())  # in the trials' creation order
    return trial_results(results, config)


def trial_results(results: list[tune.Result], config: TuneConfig) -> list[TrialResult]:
    """Each trial's outcome. Under ordered ASHA, a trial that ran past the report its decision stopped it at (it
    waited on an earlier trial) is read at that report, as the same sweep run one trial at a time would end it."""
    reports = [_reports(_result_rows(result), config.metric) for result in results]
    stops: list = [None] * len(results)
    if config.scheduler == "asha":
        rungs = asha_rungs(config.epochs, min(config.asha.grace_period, config.epochs), config.asha.reduction_factor)
        trials = [RungTrial([(epoch, float(row[config.metric])) for epoch, row in r], ended=True) for r in reports]
        stops = ordered_asha(trials, rungs, config.asha.reduction_factor, config.resolved_mode, config.epochs)
    return [_trial_result(result, config, r, stop) for result, r, stop in zip(results, reports, stops)]


def _result_rows(result: tune.Result) -> list[dict]:
    frame = result.metrics_dataframe
    return [] if frame is None else frame.to_dict("records")


def _reports(rows, metric: str) -> list[tuple[float, dict]]:
    """(epoch, row) per report of the metric, each epoch once: a resumed trial reports again the epochs after its
    checkpoint. A report without the metric (NaN in a results table) is none, as the scheduler skipped it."""
    seen, reports = set(), []
    for row in rows:
        epoch, value = row.get("epoch"), row.get(metric)
        if epoch is None or value is None or epoch != epoch or value != value or epoch in seen:
            continue
        seen.add(epoch)
        reports.append((float(epoch), row))
    return reports


def _trial_result(result: tune.Result, config: TuneConfig, reports: list, stop: int | None) -> TrialResult:
    metrics = dict(reports[stop][1]) if isinstance(stop, int) else result.metrics or {}
    epochs = int(metrics.get("epoch", 0))
    if isinstance(stop, int):
        status = "stopped early"
    elif result.error is not None:
        status = "error: " + (str(result.error).strip().splitlines() or ["?"])[-1][:200]
    elif epochs < config.epochs:
        status = "stopped early"
    else:
        status = "completed"
    value = metrics.get(config.metric)
    last = result.metrics or {}
    return TrialResult(
        trial_id=last.get("trial_id") or Path(result.path).name,
        values={key: result.config[key] for key in config.space},
        metric=None if value is None or value != value else float(value),
        epochs=epochs,
        status=status,
        node_ip=str(last.get("node_ip") or ""),
        node_id=str(last.get("node_id") or ""),
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
        rows = json.loads(result["history"]) if "history" in result else [result]  # every epoch since the last report
        epochs = [{"epoch": int(row["epoch"]), **{key: row[key] for key in CURVES if key in row}} for row in rows]
        self.runs.log(trial.trial_id, epochs)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.runs.end(trial.trial_id, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.runs.end(trial.trial_id, "FAILED")
