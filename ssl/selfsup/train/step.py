"""The training step that `pretrain` runs: views on the device, forward, backward, update, the method's hooks.

Deliberately free of Ray, MLflow and DVC, so that it can be benchmarked (and used) on a machine that
has only PyTorch.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from selfsup.config import TrainConfig
from selfsup.data.views import ViewSpec, make_views
from selfsup.methods import Method, TrainingProgress
from selfsup.models import Encoder


class TrainStep:
    """Callable `(uint8 N x H x W x 3 batch on device, generator, progress, **inputs) -> (loss, embeddings)`, detached.

    `model` is what runs forward (the method, or DDP around it); `method` is the method itself, whose
    hooks run around the optimiser step.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        views: list[ViewSpec],
        train: TrainConfig,
        device: torch.device,
        method: Method | None = None,
    ):
        self.model, self.optimizer, self.views = model, optimizer, views
        self.method = method or model
        cuda = device.type == "cuda"
        self.channels_last = cuda  # faster convolutions on tensor cores; no gain on CPU
        if cuda:
            torch.backends.cudnn.benchmark = True  # shapes never change: let cuDNN pick the fastest kernels
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
            for module in self.method.modules():
                if isinstance(module, Encoder):
                    module.channels_last = True
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if cuda and train.precision == "bf16"
            else contextlib.nullcontext()
        )
        if train.compile:
            # The encoders (the student's and any EMA copy) hold nearly all the compute; compiling them in
            # place keeps every method's Python (queues, Sinkhorn, collectives) eager and the weights' names.
            for module in self.method.modules():
                if isinstance(module, Encoder):
                    module.compile()

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator, progress: TrainingProgress, **inputs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.update(make_views(images, self.views, generator), progress, **inputs)

    def update(
        self, views: list[torch.Tensor], progress: TrainingProgress, **inputs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward, backward and optimiser step on views made elsewhere (benchmarks feed it directly). `inputs`
        go to the methods that declare them: `labels` (the supervised reference, a labelled auxiliary term),
        `indices` (Exemplar-CNN)."""
        if self.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        with self.autocast:
            loss, embeddings = self.model(views, **inputs)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.method.after_backward(progress)
        self.optimizer.step()
        self.method.after_step(progress)
        return loss.detach(), embeddings
