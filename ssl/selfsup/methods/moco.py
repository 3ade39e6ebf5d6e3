"""MoCo v2 (Chen et al., 2020): a momentum key encoder, a queue of negatives, InfoNCE, an MLP head.

The defaults follow MoCo's official CIFAR demo (facebookresearch/moco, colab/moco_cifar10_demo.ipynb):
temperature 0.1, a queue of 4096, momentum 0.99 held constant, the symmetric loss as the sum of both
directions, and lr 0.06 at batch 512 (0.03 per 256 images here)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from selfsup.config import MethodKnobs
from selfsup.distributed import all_gather
from selfsup.methods.base import Method, TrainingProgress
from selfsup.methods.common import enqueue, two_views
from selfsup.models.ema import EMATeacher
from selfsup.models.heads import mlp


def info_nce_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cross-entropy of each query against its key (the positive, logit 0) and the queued negatives."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    positive = (q * k).sum(1, keepdim=True)
    logits = torch.cat([positive, q @ queue.T], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


class MoCo(Method):
    name = "moco"
    min_batch = 1  # negatives come from the queue
    lr = 0.03  # per 256 images (SGD): the demo's 0.06 at batch 512

    # What to change on a NaN loss or a collapse.
    advice = "raise method.moco.temperature or method.moco.momentum"

    class Knobs(MethodKnobs):
        temperature: float = Field(default=0.1, gt=0)  # MoCo's CIFAR demo (v2 on ImageNet: 0.2)
        queue_size: int = Field(default=4096, ge=1)  # negatives kept, the oldest replaced first
        momentum: float = Field(default=0.99, ge=0, le=1)  # key encoder's EMA, constant (v2 on ImageNet: 0.999)
        projection_hidden_dim: int = Field(default=2048, ge=1)
        projection_dim: int = Field(default=128, ge=1)
        symmetric: bool = True  # both views query, the two losses summed (the demo's)

    views = staticmethod(two_views)

    def __init__(self, encoder: nn.Module, knobs: Knobs):
        super().__init__()
        self.encoder, self.knobs = encoder, knobs
        # MoCo v2's head has no BatchNorm.
        self.projector = mlp(encoder.feature_dim, knobs.projection_hidden_dim, knobs.projection_dim, batch_norm=False)
        self.teacher = EMATeacher(self.encoder, self.projector)
        self.register_buffer("queue", F.normalize(torch.randn(knobs.queue_size, knobs.projection_dim), dim=1))
        self.register_buffer("queue_end", torch.zeros((), dtype=torch.long))  # where the next key goes
        self._keys: list[torch.Tensor] = []  # this step's keys per view, queued after the optimiser step

    def forward(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x1, x2 = views
        q1 = self.projector(self.encoder(x1)).float()
        k2 = self.teacher(x2).float()
        with torch.autocast(q1.device.type, enabled=False):
            loss = info_nce_loss(q1, k2, self.queue, self.knobs.temperature)
            keys = [k2]
            if self.knobs.symmetric:
                q2, k1 = self.projector(self.encoder(x2)).float(), self.teacher(x1).float()
                loss = loss + info_nce_loss(q2, k1, self.queue, self.knobs.temperature)
                keys.append(k1)
        self._keys = [F.normalize(k, dim=1) for k in keys]
        return loss, q1.detach()

    @torch.no_grad()
    def after_step(self, progress: TrainingProgress) -> None:
        self.teacher.update(self.encoder, self.projector, momentum=self.knobs.momentum)
        # Every worker queues every worker's keys, view by view: one shared queue, in the order one process
        # holding the whole batch would fill it.
        self.enqueue(torch.cat([all_gather(keys) for keys in self._keys]))

    def enqueue(self, keys: torch.Tensor) -> None:
        enqueue(self.queue, self.queue_end, keys)
