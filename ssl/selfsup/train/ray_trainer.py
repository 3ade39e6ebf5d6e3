"""Pretraining through Ray Train: a `TorchTrainer` runs `train_loop` on every worker.

Ray joins the cluster at `RAY_ADDRESS` when it is set, else starts a local instance sized to this
machine. Checkpoints go through `ray.train.report`; running again with the same run name (storage
path + name) resumes from the latest one, so the caller derives the name from the config.
"""

from __future__ import annotations

import os
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
import ray
import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

from selfsup.config import ScalingConfig
from selfsup.data.shards import Shards
from selfsup.errors import ConfigError, SelfsupError, WorkerError, WorkerLostError
from selfsup.ray_cluster import connect_ray
from selfsup.train.loop import CHECKPOINT_FILE, PretrainSpec, load_checkpoint, train_loop
from selfsup.train.monitor import Monitor


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


# Streaming: the CPUs left to Ray Data's reading and decoding. Ray Train reserves its workers' CPUs first, and with
# none left Ray Data cannot run a task and `fit()` waits forever without an error.
DECODE_CPUS = 1.0
MIN_WORKER_CPUS = 0.25
SHUFFLE_BUFFER_BATCHES = 4  # each worker's local shuffle buffer, in batches


def worker_cpus(scaling: ScalingConfig, streamed: bool) -> float:
    """The CPUs each Ray Train worker reserves: scaling.cpus_per_worker, or, when streaming, at most what leaves
    DECODE_CPUS of the cluster to Ray Data (the worker still runs scaling.cpus_per_worker threads)."""
    if not streamed:
        return scaling.cpus_per_worker
    cluster = ray.cluster_resources().get("CPU", 0)
    per_worker = min(scaling.cpus_per_worker, (cluster - DECODE_CPUS) / scaling.num_workers)
    if per_worker < MIN_WORKER_CPUS:
        raise ConfigError(
            f"params.yaml: streaming needs {DECODE_CPUS:g} CPU for Ray Data's decoding beside scaling.num_workers="
            f"{scaling.num_workers} worker(s) of at least {MIN_WORKER_CPUS:g} CPU, and the Ray cluster has "
            f"{cluster:g}: use fewer workers, or data.streaming: false"
        )
    if per_worker < scaling.cpus_per_worker:
        print(
            f"streaming: each worker reserves {per_worker:g} of the cluster's {cluster:g} CPUs (scaling."
            f"cpus_per_worker={scaling.cpus_per_worker:g}), leaving {cluster - per_worker * scaling.num_workers:g} "
            "to Ray Data",
            flush=True,
        )
    return per_worker


class RayStreamedImages:
    """A Ray Train worker's part of the streamed dataset (`ray.train.get_dataset_shard`): across the workers every
    image once per epoch (Ray Train splits each pass equally), shards in a new order each epoch, then shuffled in a
    local buffer seeded by the epoch."""

    def __init__(self, count: int, seed: int, dataset: str = "train"):
        self.count = count
        self._shard = ray.train.get_dataset_shard(dataset)
        self._seed = seed

    def batches(self, epoch: int, batch_size: int, device):
        import torch

        for batch in self._shard.iter_torch_batches(
            batch_size=batch_size,
            drop_last=True,
            device=device,
            dtypes={"image": torch.uint8, "index": torch.int64, "label": torch.int64},
            local_shuffle_buffer_size=SHUFFLE_BUFFER_BATCHES * batch_size,
            local_shuffle_seed=self._seed * 100_003 + epoch,
        ):
            yield batch["image"], batch["index"], batch["label"]


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
        if config["images"] is None:  # streamed: the dataset passed to the trainer
            images = RayStreamedImages(config["streamed_count"], config["spec"].train.seed)
        else:
            images = ray.get(config["images"])
        train_loop(images, config["spec"], RaySession(config["use_gpu"]), config["monitor"], labels)
    except SelfsupError as error:
        # Returned: a NaN loss or a collapse is one line, not a worker's traceback. Every rank meets it at the same
        # epoch (the loss is all-reduced), so no rank waits for another. Anything else is raised: Ray stops every
        # rank, prints the traceback, and `pretrain_with_ray` decides whether a restart can help.
        return error


def pretrain_with_ray(
    images: np.ndarray | Shards,
    spec: PretrainSpec,
    scaling: ScalingConfig,
    storage_path: str | Path,
    run_name: str,
    monitor: Monitor | None = None,
    labels: np.ndarray | None = None,
) -> dict:
    """Train on a Ray cluster and return the final checkpoint (method and optimiser state, history). `images` are
    uint8 arrays every worker holds, or shards that Ray Data streams to them. `labels` (None for unlabelled images)
    go to `train_loop`, which alone decides whether the spec trains on them.

    A lost worker (its process killed, its node gone) is restarted from the latest checkpoint, up to
    `scaling.max_failures` times; an error raised by the code (a bug, out of memory) is not: a restart would only
    repeat it. Both end in one line that says which checkpoint is kept."""
    streamed = isinstance(images, Shards)
    connect_ray(scaling.dashboard, streaming=streamed)
    check_resources(scaling)
    resources = {"CPU": worker_cpus(scaling, streamed)}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    datasets = {}
    if streamed:
        import warnings

        from selfsup.data.shards import read_streamed

        datasets["train"] = read_streamed(images.uri, images.files, spec.train.seed, spec.image_size)
        # Ray Train's own default DataConfig sets an option Ray Data deprecates: nothing a user can change.
        warnings.filterwarnings("ignore", message=".*exclude_resources.*", category=DeprecationWarning)
    config = {
        # In memory: through the object store, which works on a multi-node cluster too. Streamed: Ray Data's.
        "images": None if streamed else ray.put(images),
        "streamed_count": images.count if streamed else 0,
        "labels": None if labels is None else ray.put(labels),
        "spec": spec,
        "monitor": monitor,
        "use_gpu": scaling.use_gpu,
        "cpus_per_worker": scaling.cpus_per_worker,
    }
    trainer = partial(
        TorchTrainer,
        _ray_worker,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        datasets=datasets,
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.num_workers, use_gpu=scaling.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=str(Path(storage_path).resolve()),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            # Ray would retry every failure alike; the loop below retries only lost workers. A new `fit()` of the
            # same run name resumes from its latest checkpoint.
            failure_config=ray.train.FailureConfig(max_failures=0),
            # Our per-epoch line is enough; at WARNING a worker lost and restarted also prints Ray's 30-line traceback
            # of the backend's shutdown ("expected if one of the workers has crashed").
            logging_config=ray.train.LoggingConfig(log_level="ERROR"),
        ),
    )
    run_folder = Path(storage_path) / run_name
    for attempt in range(scaling.max_failures + 1):
        try:
            result = trainer().fit()
            break
        except (ray.train.WorkerGroupError, ray.train.ControllerError) as error:
            failures = _failures(error)
            raised = [failure for failure in failures if not _lost_worker(failure)]
            if raised or attempt == scaling.max_failures:
                # Disconnect first: the controller's teardown logs (a placement-group cleaner's timeout traceback)
                # would otherwise reach this terminal after the one line that says what happened.
                ray.shutdown()
                if raised:
                    raise _worker_raised(raised[0], run_folder) from None
                raise _workers_lost(failures, scaling.max_failures, run_folder) from None
            print(
                f"a Ray Train worker was lost ({_first_sentence(failures[0])}); restarting from the latest checkpoint "
                f"({attempt + 1} of scaling.max_failures={scaling.max_failures})",
                flush=True,
            )
    if isinstance(result.return_value, SelfsupError):
        raise result.return_value
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train finished without a checkpoint; see the logs under {storage_path}")
    with result.checkpoint.as_directory() as folder:
        return load_checkpoint(Path(folder) / CHECKPOINT_FILE)


def _failures(error: ray.train.TrainingFailedError) -> list[BaseException]:
    if isinstance(error, ray.train.WorkerGroupError):
        return list(error.worker_failures.values()) or [error]
    return [error.controller_failure]


def _lost_worker(failure: BaseException) -> bool:
    """Ray's own errors (a worker's process or node gone, its health check failed) are what a restart can cure; an
    error the training code raised (a bug, out of memory, a NaN loss) would only recur."""
    return type(failure).__module__.split(".")[0] == "ray"


def _first_sentence(failure: BaseException) -> str:
    lines = str(failure).strip().splitlines()
    return lines[-1].split(". ")[0][:200] if lines else type(failure).__name__


def checkpoint_kept(run_folder: Path) -> str:
    """Which checkpoint an interrupted run leaves for the next `dvc repro` to resume from."""
    checkpoints = sorted(p for p in run_folder.glob("checkpoint_*") if p.is_dir()) if run_folder.is_dir() else []
    if checkpoints:
        where = os.path.relpath(checkpoints[-1]) if checkpoints[-1].is_relative_to(Path.cwd()) else checkpoints[-1]
        return f"the latest checkpoint is kept in {where}: `dvc repro` resumes from it"
    return "no checkpoint was written yet: `dvc repro` starts again"


def _worker_raised(failure: BaseException, run_folder: Path) -> SelfsupError:
    """A worker's own error: selfsup's as it is; anything else in one line under the traceback Ray printed."""
    if isinstance(failure, SelfsupError):
        return failure
    message = str(failure).strip().splitlines()[0][:300] if str(failure).strip() else ""
    return WorkerError(
        f"a Ray Train worker raised {type(failure).__name__}: {message} (its traceback is above); not retried, a "
        f"restart would repeat it; {checkpoint_kept(run_folder)}"
    )


def _workers_lost(failures: list[BaseException], max_failures: int, run_folder: Path) -> WorkerLostError:
    """One line for restarts run out: what failed last, and the checkpoint the next `dvc repro` resumes from."""
    return WorkerLostError(
        f"a Ray Train worker failed {max_failures + 1} time(s), past scaling.max_failures={max_failures} "
        f"(last: {_first_sentence(failures[0])}); {checkpoint_kept(run_folder)}"
    )
