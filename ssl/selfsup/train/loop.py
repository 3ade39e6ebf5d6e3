"""The per-worker pretraining loop, the same for every method and for any number of workers.

It knows nothing of Ray: its caller hands it a `Session` that says which worker it is and carries
metrics and checkpoints out (Ray Train's in `selfsup.train.ray_trainer`, or `LocalSession` for a
plain single-process run). Each worker holds the whole uint8 dataset on its device and takes its shard of
a shared per-epoch permutation, or, for a dataset larger than memory, takes its part of a stream of batches
(`StreamedImages`, Ray Data's in `selfsup.train.ray_trainer`); it makes the views on the device.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from selfsup.config import MethodConfig, ModelConfig, TrainConfig, ViewConfig
from selfsup.data.arrays import Manifest
from selfsup.data.views import view_generator
from selfsup.errors import CheckpointError, CollapseError, ConfigError, NonFiniteLossError
from selfsup.methods import Method, TrainingProgress, build_method, method_class, method_views, uses_labels
from selfsup.models import Encoder
from selfsup.models.batchnorm import convert_to_global_batchnorm
from selfsup.params import Params, learning_rate
from selfsup.train.collapse import effective_rank, embedding_std
from selfsup.train.monitor import Monitor
from selfsup.train.optim import build_optimizer, set_lr, warmup_cosine
from selfsup.train.step import TrainStep

CHECKPOINT_FILE = "checkpoint.pt"


@dataclass(frozen=True)
class PretrainSpec:
    """Everything a worker needs besides the images: typed configs plus the dataset's statistics."""

    model: ModelConfig
    method: MethodConfig
    views: ViewConfig
    train: TrainConfig
    mean: list[float]
    std: list[float]
    image_size: int = 32  # the stored images' side
    num_classes: int = 0  # of the labels, for the supervised reference and train.label_loss_weight

    @property
    def uses_labels(self) -> bool:
        return uses_labels(self.method, self.train)

    @property
    def view_size(self) -> int:
        """The side training sees: ViTs size their positional embedding by it, heads that rebuild the image
        (inpainting, colorization) their outputs, multi-crop its local crops."""
        return self.views.size or self.image_size

    def __post_init__(self) -> None:
        if self.view_size > self.image_size:
            raise ConfigError(
                f"params.yaml: views.size={self.view_size} is larger than the {self.image_size} px images stored "
                f"(data.image_size): their crops would be enlarged, with no detail to show; set views.size to at most "
                f"{self.image_size}, or raise data.image_size and re-run prepare"
            )
        _check_patches_tile_every_view(self)

    @classmethod
    def from_params(cls, params: Params, manifest: Manifest) -> PretrainSpec:
        """What params.yaml says of pretraining, on the prepared dataset the manifest describes."""
        return cls(
            params.model,
            params.method,
            params.views,
            params.train,
            manifest.mean,
            manifest.std,
            manifest.image_size[0],
            len(manifest.class_names),
        )


def _check_patches_tile_every_view(spec: PretrainSpec) -> None:
    """A ViT cuts each view into whole patches: refuse, before any compute, a view size the patch does not
    divide (multi-crop's local views are a fraction of the image, e.g. 18 px at 32)."""
    if not spec.model.backbone.startswith("vit"):
        return
    patch, image = spec.model.patch_size, spec.view_size
    if image % patch:
        size_key = "views.size" if spec.views.size else "data.image_size"
        raise ConfigError(
            f"params.yaml: model.patch_size={patch} does not divide the {image} px views; pick a divisor of "
            f"{image} or set {size_key} to a multiple of {patch}"
        )
    for view in method_views(spec.method, spec.views, spec.image_size):
        if view.size and view.size % patch:
            fits = max(patch, view.size // patch * patch)
            raise ConfigError(
                f"params.yaml: method.{spec.method.name}.local_size={spec.method.knobs.local_size} makes "
                f"{view.size} px local crops, which model.patch_size={patch} does not divide; set it to "
                f"{fits / image:.4g} ({fits} px)"
            )


class Session(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def latest_checkpoint(self) -> dict | None: ...

    def report(self, metrics: dict, checkpoint: dict | None) -> None:
        """Called by every rank at each checkpoint epoch; only rank 0 passes the state."""


@dataclass
class LocalSession:
    """One process, checkpoints in a folder: for runs and benchmarks without Ray."""

    checkpoint_dir: Path | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rank: int = 0
    world_size: int = 1
    reports: list[dict] = field(default_factory=list)

    def latest_checkpoint(self) -> dict | None:
        path = self.checkpoint_dir and Path(self.checkpoint_dir) / CHECKPOINT_FILE
        return load_checkpoint(path) if path and path.exists() else None

    def report(self, metrics: dict, checkpoint: dict | None) -> None:
        self.reports.append(metrics)
        if checkpoint is not None and self.checkpoint_dir is not None:
            path = Path(self.checkpoint_dir) / CHECKPOINT_FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(checkpoint, path.with_suffix(".partial"))
            os.replace(path.with_suffix(".partial"), path)  # a kill mid-write keeps the previous one


def load_checkpoint(path: str | Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or unreadable ({error}); delete that checkpoint folder to "
            "resume from an earlier one, or delete checkpoints/ to start over"
        ) from None


def build_model(spec: PretrainSpec, num_images: int = 0) -> Method:
    """The method module (encoder + heads), initialised from train.seed: identical on every worker.
    `num_images`, the training set's size, sizes Exemplar-CNN's classes."""
    torch.manual_seed(spec.train.seed)
    encoder = Encoder(spec.model, spec.mean, spec.std, image_size=spec.view_size)
    return build_method(encoder, spec.method, spec.num_classes, spec.train.label_loss_weight, num_images)


def single_process_step(spec: PretrainSpec, device: torch.device, num_images: int = 0) -> TrainStep:
    """A fresh method, optimiser and step in one process: what a worker builds, without DDP (benchmarks)."""
    method = build_model(spec, num_images).to(device)
    views = method_views(spec.method, spec.views, spec.image_size)
    optimizer = build_optimizer(method, spec.train, learning_rate(spec.train, spec.method))
    return TrainStep(method, optimizer, views, spec.train, device)


class StreamedImages(Protocol):
    """Training images streamed to this worker rather than held in its memory."""

    count: int  # of every worker's part together

    def batches(
        self, epoch: int, batch_size: int, device: torch.device
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """This worker's part of the epoch, in an order that changes with the epoch: (uint8 N x H x W x 3 images,
        their indices in the dataset, their labels), each on `device`, every batch full."""
        ...


def _in_memory_batches(
    data: torch.Tensor,
    targets: torch.Tensor | None,
    epoch: int,
    seed: int,
    session: Session,
    batch_size: int,
    steps: int,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """This worker's shard of the epoch's permutation of the images on the device, shared by every worker."""
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    shard = order[session.rank :: session.world_size].to(data.device)
    for i in range(steps):
        batch = shard[i * batch_size : (i + 1) * batch_size]
        yield data[batch], batch, None if targets is None else targets[batch]


def train_loop(
    images: np.ndarray | StreamedImages,
    spec: PretrainSpec,
    session: Session,
    monitor: Monitor | None = None,
    labels: np.ndarray | None = None,
) -> dict:
    """Pretrain on uint8 N x H x W x 3 images (or streamed ones); returns the final checkpoint (the last one
    reported).

    With a `monitor`, rank 0 measures RankMe (and kNN accuracy, with labels) every `train.monitor_every` epochs
    and at the last one.
    `labels` (of the images, in order; None for unlabelled images) reach the step only when the spec trains on
    them (`spec.uses_labels`): this is the one place that decides, so callers hand over what they have.
    """
    train, device = spec.train, session.device
    if spec.uses_labels and labels is None:
        raise ConfigError(
            f"method {spec.method.name} with train.label_loss_weight={train.label_loss_weight} trains on labels, "
            "but none were given"
        )
    streamed = not isinstance(images, np.ndarray)
    count = images.count if streamed else len(images)
    local_batch = train.batch_size // session.world_size
    steps_per_epoch = count // session.world_size // local_batch
    if steps_per_epoch == 0:
        raise ConfigError(
            f"params.yaml: train.batch_size={train.batch_size} exceeds the {count} training images; lower it"
        )
    method = build_model(spec, num_images=count).to(device)
    peak_lr = learning_rate(train, spec.method)
    optimizer = build_optimizer(method, train, peak_lr)
    state = session.latest_checkpoint()
    start_epoch, history = 0, []  # epochs done and their metrics, restored on resume
    if state is not None:
        try:
            method.load_state_dict(state["method"])
            optimizer.load_state_dict(state["optimizer"])
            start_epoch, history = state["epoch"], state["history"]
        except (KeyError, RuntimeError, ValueError) as error:  # another architecture or format
            raise CheckpointError(
                f"the checkpoint does not fit this model ({str(error).splitlines()[0]}); delete checkpoints/ "
                "to start over"
            ) from None
        if session.rank == 0:
            print(f"resuming from the checkpoint of epoch {start_epoch}/{train.epochs}", flush=True)
    saved_epoch = start_epoch  # the latest epoch a checkpoint holds
    if device.type == "cuda":
        method.to(memory_format=torch.channels_last)  # before DDP builds its gradient buckets
    model = method
    if session.world_size > 1:
        # BatchNorm over the global batch, as one worker would see it: else each worker's statistics
        # leak which images share its batch (SimCLR's local-BN problem). SyncBatchNorm is CUDA-only.
        if device.type == "cuda":
            nn.SyncBatchNorm.convert_sync_batchnorm(method)
        else:
            convert_to_global_batchnorm(method)
        model = DistributedDataParallel(method)
    views = method_views(spec.method, spec.views, spec.image_size)
    step = TrainStep(model, optimizer, views, train, device, method=method)
    data = None if streamed else torch.tensor(images, device=device)  # the whole uint8 dataset stays on the device
    targets = torch.tensor(labels, dtype=torch.long, device=device) if spec.uses_labels and not streamed else None
    with_indices = method_class(spec.method).uses_indices
    advice = method_class(spec.method).advice
    low_std_epochs = 0  # consecutive epochs whose embeddings looked collapsed

    total_steps, warmup_steps = train.epochs * steps_per_epoch, train.warmup_epochs * steps_per_epoch
    for epoch in range(start_epoch, train.epochs):
        method.train()
        if streamed:
            batches = images.batches(epoch, local_batch, device)
        else:
            batches = _in_memory_batches(data, targets, epoch, train.seed, session, local_batch, steps_per_epoch)
        generator = view_generator(train.seed, epoch, session.rank, device)
        started, sums = time.perf_counter(), torch.zeros(2, device=device)  # loss, embedding std
        for i, (batch, indices, batch_labels) in enumerate(batches):
            if i >= steps_per_epoch:  # a stream's epoch is read to its end, every worker's the same number of steps
                continue
            progress = TrainingProgress(epoch * steps_per_epoch + i, total_steps, steps_per_epoch)
            lr = warmup_cosine(progress.step, total_steps, warmup_steps, peak_lr)
            set_lr(optimizer, lr)
            inputs = {"labels": batch_labels} if spec.uses_labels else {}
            if with_indices:  # each image's index is its class (Exemplar-CNN)
                inputs["indices"] = indices
            loss, embeddings = step(batch, generator, progress, **inputs)
            sums[0] += loss
            sums[1] += embedding_std(embeddings)
        if session.world_size > 1:  # every rank sees the global means, so all stop together
            torch.distributed.all_reduce(sums)
            sums /= session.world_size
        loss, std = (sums / steps_per_epoch).tolist()  # one device sync per epoch, not per step
        seconds = time.perf_counter() - started
        kept = f"the checkpoint of epoch {saved_epoch} is kept" if saved_epoch else "no checkpoint was written yet"
        stopped = [*history, {"epoch": epoch + 1, "loss": loss, "lr": lr, "embedding_std": std}]  # the curves to here
        if not math.isfinite(loss):
            raise NonFiniteLossError(
                f"the loss became {loss} in epoch {epoch + 1}; {kept}. Lower train.lr (now {peak_lr:.4g}); {advice}",
                stopped,
            )
        low_std_epochs = low_std_epochs + 1 if std < train.collapse_std else 0
        if low_std_epochs >= train.collapse_patience:
            raise CollapseError(
                f"{spec.method.name} collapsed: the embeddings' std stayed below train.collapse_std="
                f"{train.collapse_std} for {low_std_epochs} epochs (now {std:.3f}, epoch {epoch + 1}); {kept}. "
                f"Lower train.lr (now {peak_lr:.4g}) or raise train.warmup_epochs; {advice}",
                stopped,
            )
        metrics = {
            "epoch": epoch + 1,
            "loss": round(loss, 6),
            "lr": round(lr, 8),
            "images_per_s": round(steps_per_epoch * train.batch_size / seconds, 1),
            "epoch_s": round(seconds, 3),
            "embedding_std": round(std, 4),
            "effective_rank": round(effective_rank(embeddings), 2),  # of the epoch's last batch
        }
        last = epoch + 1 == train.epochs
        watched = ""
        if monitor is not None and session.rank == 0 and train.monitor_every:
            if (epoch + 1) % train.monitor_every == 0 or last:
                measured = monitor.measure(method.encoder, device, data)
                metrics.update({k: round(v, 4) for k, v in measured.items()})
                watched = f"  RankMe {metrics['monitor_rankme']:.1f}"
                if "monitor_knn_top1" in metrics:
                    watched += f"  val kNN {metrics['monitor_knn_top1']:.1%}"
                if "monitor_linear_top1" in metrics:
                    watched += f"  val linear {metrics['monitor_linear_top1']:.1%}"
        history.append(metrics)
        if session.rank == 0:
            print(
                f"epoch {epoch + 1:>3}/{train.epochs}  loss {loss:.4f}  lr {lr:.4g}  "
                f"std {std:.2f}  rank {metrics['effective_rank']:.1f}  "
                f"{metrics['images_per_s']:,.0f} img/s  {seconds:.1f} s{watched}",
                flush=True,
            )
        # A checkpoint is written only while the embeddings look healthy, so the one a collapse keeps is good.
        if ((epoch + 1) % train.checkpoint_every == 0 and not low_std_epochs) or last:
            # Only at checkpoints: each Ray report waits for the controller's poll (every 2 s), a
            # cost per call that per-epoch reports would pay on every short epoch. Every rank
            # reports (Ray's report is a barrier); rank 0 alone carries the state.
            state = None
            if session.rank == 0:
                state = {
                    "method": {k: v.detach().cpu() for k, v in method.state_dict().items()},
                    "optimizer": optimizer.state_dict(),
                    "epoch": epoch + 1,
                    "history": history,
                }
            session.report(metrics, state)
            saved_epoch = epoch + 1
    return state if state is not None else session.latest_checkpoint()
