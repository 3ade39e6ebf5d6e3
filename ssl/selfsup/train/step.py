"""The training step that `pretrain` runs: views on the device, forward, backward, update.

Deliberately free of Ray, MLflow and DVC, so that it can be benchmarked (and used) on a machine that
has only PyTorch.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from selfsup.config import TrainConfig, ViewConfig
from selfsup.data.views import make_view


class TrainStep:
    """Callable `(uint8 N x H x W x 3 batch on device, generator) -> detached loss`."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        views: ViewConfig,
        num_views: int,
        train: TrainConfig,
        device: torch.device,
    ):
        self.optimizer = optimizer
        self.views, self.num_views = views, num_views
        cuda = device.type == "cuda"
        self.channels_last = cuda  # faster convolutions on tensor cores; no gain on CPU
        if cuda:
            torch.backends.cudnn.benchmark = True  # shapes never change: let cuDNN pick the fastest kernels
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if cuda and train.precision == "bf16"
            else contextlib.nullcontext()
        )
        self.forward = torch.compile(model) if train.compile else model

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.update([make_view(images, self.views, generator) for _ in range(self.num_views)])

    def update(self, views: list[torch.Tensor]) -> torch.Tensor:
        """Forward, backward and optimiser step on views made elsewhere (benchmarks feed it directly)."""
        if self.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        with self.autocast:
            loss = self.forward(views)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()
