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
from selfsup.errors import ConfigError, RayClusterError, SelfsupError  # noqa: E402
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


class RaySession:
    """The loop's `Session` on a Ray Train worker: its rank, its device, checkpoints through Ray."""

    def __init__(self, use_gpu: bool):
        import torch
        from ray.train.torch import get_device

        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.device = get_device() if use_gpu else torch.device("cpu")

    def latest_checkpoint(self) -> dict | None:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            return load_checkpoint(Path(folder) / CHECKPOINT_FILE)

    def report(self, metrics: dict, checkpoint: dict | None) -> None:
        import torch

        if checkpoint is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as folder:
            torch.save(checkpoint, Path(folder) / CHECKPOINT_FILE)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def quiet_ray_train_worker() -> None:
    """Ray logs every report at INFO through a logger named after its file, outside "ray.train"."""
    import logging

    try:
        from ray.train.v2._internal.execution import context as ray_context

        logging.getLogger(ray_context.__file__).setLevel(logging.WARNING)
    except ImportError:  # a Ray version laid out otherwise: only noisier
        pass


def _ray_worker(config: dict) -> None:
    """Runs on each Ray worker: adapt Ray's context to the loop's Session and run the loop."""
    import torch

    quiet_ray_train_worker()
    torch.set_num_threads(max(1, int(config["cpus_per_worker"])))
    train_loop(ray.get(config["images"]), config["spec"], RaySession(config["use_gpu"]), config["monitor"])


def pretrain_with_ray(
    images: np.ndarray,
    spec: PretrainSpec,
    scaling: ScalingConfig,
    storage_path: str | Path,
    run_name: str,
    monitor: KnnMonitor | None = None,
) -> dict:
    """Train on a Ray cluster and return the final checkpoint (method and optimiser state, history)."""
    connect_ray()
    check_resources(scaling)
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={
            "images": ray.put(images),  # through the object store: works on a multi-node cluster too
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
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # our per-epoch line is enough
        ),
    )
    try:
        result = trainer.fit()
    except ray.train.WorkerGroupError as error:
        raise _root_cause(error) from None
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train finished without a checkpoint; see the logs under {storage_path}")
    with result.checkpoint.as_directory() as folder:
        return load_checkpoint(Path(folder) / CHECKPOINT_FILE)


def _root_cause(error: ray.train.WorkerGroupError) -> Exception:
    """A worker's own actionable error (a NaN loss, a too-large batch), not Ray's wrapper around it."""
    for failure in error.worker_failures.values():
        cause = failure
        while cause is not None and not isinstance(cause, SelfsupError):
            cause = cause.__cause__
        if cause is not None:
            return cause
    return error
