"""The exponential-moving-average teacher that MoCo, BYOL, DINO (and OBoW) share, with its schedule."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def cosine_momentum(base: float, progress: float) -> float:
    """BYOL's schedule: base at the start, 1 at the end, cosine in between (progress in [0, 1])."""
    return 1 - (1 - base) * (math.cos(math.pi * min(1.0, progress)) + 1) / 2


class EMATeacher(nn.Module):
    """A frozen deep copy of the student modules, chained, that follows them:
    theta_t <- m * theta_t + (1 - m) * theta_s.

    It lives inside the method module, so its weights are in every checkpoint and, like the student,
    identical on every worker. Only parameters are averaged; BatchNorm buffers keep the teacher's own
    running statistics, as in official MoCo and BYOL (the teacher runs in train mode and uses batch
    statistics, so they matter only when the teacher itself is evaluated).
    """

    def __init__(self, *students: nn.Module):
        super().__init__()
        self.module = nn.Sequential(*copy.deepcopy(students))  # a copy, never a reference (dinov2 #407)
        self.module.requires_grad_(False)

    @property
    def encoder(self) -> nn.Module:
        """The teacher's copy of the first student module, the encoder (OBoW reads its feature map)."""
        return self.module[0]

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.module(*args, **kwargs)

    @torch.no_grad()
    def update(self, *students: nn.Module, momentum: float) -> None:
        student = [p.detach() for module in students for p in module.parameters()]
        # One fused kernel over all tensors, as timm's ModelEmaV3 does.
        torch._foreach_lerp_(list(self.module.parameters()), student, 1 - momentum)
