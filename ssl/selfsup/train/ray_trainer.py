"""Pretraining through Ray Train: a `TorchTrainer` runs `train_loop` on every worker.

Ray joins the cluster at `RAY_ADDRESS` when it is set, else starts a local instance sized to this
machine. Checkpoints go through `ray.train.report`; running again with the same run name (storage
path + name) resumes from the latest one, so the caller derives the name from the config.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

# Quiet, private defaults for a workstation; a cluster's own settings win. Set before Ray starts.
for _key, _value in {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    # The controller polls its workers this often (Ray's default: 2 s), and each `report` and the end of
    # `fit()` wait for that poll: 0.2 s (what Ray's own tests use) saves seconds per run for a few tiny tasks.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
}.items():
    os.environ.setdefault(_key, _value)

import ray  # noqa: E402
import ray.train  # noqa: E402
from ray.train.torch import TorchConfig, TorchTrainer  # noqa: E402

from selfsup.config import ScalingConfig  # noqa: E402
from selfsup.errors import ConfigError, RayClusterError, SelfsupError, WorkerLostError  # noqa: E402
from selfsup.reachability import unreachable  # noqa: E402
from selfsup.train.loop import CHECKPOINT_FILE, PretrainSpec, load_checkpoint, train_loop  # noqa: E402
from selfsup.train.monitor import KnnMonitor  # noqa: E402


def connect_ray() -> None:
    """Join RAY_ADDRESS if set (failing fast when it is unreachable), else start a local instance."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        _check_reachable(address)
        ray.init(address=address, log_to_driver=True)
        return
    ray.init(
        num_cpus=os.cpu_count(),
        object_store_memory=256 << 20,  # else each node claims 30% of RAM
        _node_ip_address="127.0.0.1",
    )


def _check_reachable(address: str) -> None:
    if address == "auto":
        return
    problem = unreachable(address, default_port=10001 if address.startswith("ray://") else 6379)
    if problem:
        raise RayClusterError(
            f"the Ray cluster at RAY_ADDRESS={address} is unreachable ({problem}): start it "
            "(`ray start --head`), fix the address, or unset RAY_ADDRESS to run on a local instance"
        ) from None


def check_resources(scaling: ScalingConfig) -> None:
    """Fail before training when the cluster cannot place every worker (Ray would wait forever)."""
    available = ray.cluster_resources()
    needs = {"CPU": scaling.num_workers * scaling.cpus_per_worker}
    if scaling.use_gpu:
        needs["GPU"] = scaling.num_workers * scaling.gpus_per_worker
    for resource, needed in needs.items():
        have = available.get(resource, 0)
        if needed > have:
            per = scaling.cpus_per_worker if resource == "CPU" else scaling.gpus_per_worker
            fitting = int(have // per)
            raise ConfigError(
                f"params.yaml: scaling.num_workers={scaling.num_workers} needs {needed:g} {resource} "
                f"({per:g} per worker) but the Ray cluster has {have:g}; allowed: at most {fitting} "
                f"worker(s){' or scaling.use_gpu: false' if resource == 'GPU' else ''}"
            )

    largest = {
        resource: max((node["Resources"].get(resource, 0) for node in ray.nodes() if node["Alive"]), default=0)
        for resource in needs
    }
    for resource, per in (("CPU", scaling.cpus_per_worker), ("GPU", scaling.gpus_per_worker)):
        if resource in needs and per > largest[resource]:  # a worker cannot span nodes
            raise ConfigError(
                f"params.yaml: scaling.{resource.lower()}s_per_worker={per:g} exceeds the largest Ray node's "
                f"{largest[resource]:g} {resource}; allowed: at most {largest[resource]:g}"
            )


class CheckpointsThroughRay:
    """The loop's checkpoints through a Ray API that has `report`, `get_checkpoint` and `Checkpoint`: Ray Train's
    for a pretraining worker, Ray Tune's for a trial."""

    def __init__(self, api):
        self._api = api

    def latest_checkpoint(self) -> dict | None:
        checkpoint = self._api.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            return load_checkpoint(Path(folder) / CHECKPOINT_FILE)

    def report(self, metrics: dict, checkpoint: dict | None) -> None:
        import torch

        if checkpoint is None:
            self._api.report(metrics)
            return
        with tempfile.TemporaryDirectory() as folder:
            torch.save(checkpoint, Path(folder) / CHECKPOINT_FILE)
            self._api.report(metrics, checkpoint=self._api.Checkpoint.from_directory(folder))


class RaySession(CheckpointsThroughRay):
    """The loop's `Session` on a Ray Train worker: its rank, its device, checkpoints through Ray Train."""

    def __init__(self, use_gpu: bool):
        import torch
        from ray.train.torch import get_device

        super().__init__(ray.train)
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.device = get_device() if use_gpu else torch.device("cpu")


def quiet_ray_train_worker() -> None:
    """Ray logs every report at INFO through a logger named after its file, outside "ray.train"."""
    import logging

    try:
        from ray.train.v2._internal.execution import context as ray_context

        logging.getLogger(ray_context.__file__).setLevel(logging.WARNING)
    except ImportError:  # a Ray version laid out otherwise: only noisier
        pass


def _ray_worker(config: dict) -> SelfsupError | None:
    """Runs on each Ray worker: adapt Ray's context to the loop's Session and run the loop."""
    import torch

    quiet_ray_train_worker()
    torch.set_num_threads(max(1, int(config["cpus_per_worker"])))
    try:
        labels = None if config["labels"] is None else ray.get(config["labels"])
        train_loop(ray.get(config["images"]), config["spec"], RaySession(config["use_gpu"]), config["monitor"], labels)
    except SelfsupError as error:
        # Returned, not raised: a raise counts as a lost worker and is retried (scaling.max_failures), but a NaN
        # loss or a collapse would only recur. Every rank meets it at the same epoch (the loss is all-reduced).
        return error


def pretrain_with_ray(
    images: np.ndarray,
    spec: PretrainSpec,
    scaling: ScalingConfig,
    storage_path: str | Path,
    run_name: str,
    monitor: KnnMonitor | None = None,
    labels: np.ndarray | None = None,
) -> dict:
    """Train on a Ray cluster and return the final checkpoint (method and optimiser state, history). `labels`
    (None for unlabelled images) go to `train_loop`, which alone decides whether the spec trains on them."""
    connect_ray()
    check_resources(scaling)
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={
            "images": ray.put(images),  # through the object store: works on a multi-node cluster too
            "labels": None if labels is None else ray.put(labels),
            "spec": spec,
            "monitor": monitor,
            "use_gpu": scaling.use_gpu,
            "cpus_per_worker": scaling.cpus_per_worker,
        },
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.num_workers, use_gpu=scaling.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=str(Path(storage_path).resolve()),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=scaling.max_failures),
            # Our per-epoch line is enough; at WARNING a worker lost and restarted also prints Ray's 30-line traceback
            # of the backend's shutdown ("expected if one of the workers has crashed").
            logging_config=ray.train.LoggingConfig(log_level="ERROR"),
        ),
    )
    try:
        result = trainer.fit()
    except ray.train.WorkerGroupError as error:
        lost = _workers_lost(error, scaling.max_failures, Path(storage_path) / run_name)
        # Disconnect first: the controller's own teardown logs (a placement-group cleaner's timeout traceback)
        # would otherwise reach this terminal after the one line that says what happened.
        ray.shutdown()
        raise lost from None
    if isinstance(result.return_value, SelfsupError):
        raise result.return_value
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train finished without a checkpoint; see the logs under {storage_path}")
    with result.checkpoint.as_directory() as folder:
        return load_checkpoint(Path(folder) / CHECKPOINT_FILE)


def _workers_lost(error: ray.train.WorkerGroupError, max_failures: int, run_folder: Path) -> WorkerLostError:
    """One line for retries run out: what failed last, and the checkpoint the next `dvc repro` resumes from."""
    reasons = [str(failure).strip().splitlines()[-1] for failure in error.worker_failures.values() if str(failure)]
    reason = reasons[0].split(". ")[0][:200] if reasons else type(error).__name__  # its first sentence
    checkpoints = sorted(p for p in run_folder.glob("checkpoint_*") if p.is_dir()) if run_folder.is_dir() else []
    kept = (
        f"the latest checkpoint is kept in {checkpoints[-1]}: `dvc repro` resumes from it"
        if checkpoints
        else "no checkpoint was written yet: `dvc repro` starts again"
    )
    return WorkerLostError(
        f"a Ray Train worker failed {max_failures + 1} time(s), past scaling.max_failures={max_failures} "
        f"(last: {reason}); {kept}"
    )
