"""Barlow Twins (Zbontar et al., 2021): the cross-correlation of two views' embeddings pushed to identity."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from selfsup.config import MethodKnobs, ViewConfig
from selfsup.data.views import ViewSpec
from selfsup.distributed import all_reduce_sum, all_reduce_with_grad
from selfsup.methods.base import Method
from selfsup.methods.common import asymmetric_views
from selfsup.models.heads import mlp


def standardize(z: torch.Tensor, count: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Each dimension to zero mean and unit variance over the global batch of `count` images (an
    affine-free BatchNorm whose statistics include every worker's images, with gradients through them)."""
    mean = all_reduce_with_grad(z.sum(0)) / count
    variance = all_reduce_with_grad(((z - mean) ** 2).sum(0)) / count
    return (z - mean) / torch.sqrt(variance + eps)


def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambda_offdiagonal: float) -> torch.Tensor:
    """sum_i (1 - C_ii)^2 + lambda * sum_{i != j} C_ij^2, C the cross-correlation over the global batch."""
    n = all_reduce_sum(torch.tensor([float(len(z1))], device=z1.device))  # the global batch, counted once
    c = all_reduce_with_grad(standardize(z1, n).T @ standardize(z2, n)) / n  # divided by the global count
    on_diagonal = (torch.diagonal(c) - 1).pow(2).sum()
    off_diagonal = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
    return on_diagonal + lambda_offdiagonal * off_diagonal


class BarlowTwins(Method):
    name = "barlow_twins"
    min_batch = 2  # a correlation needs two images
    lr = 0.01  # per 256 images (SGD); higher rates ended below random init on the digits (docs/methods.md)

    # What to change on a NaN loss or a collapse.
    advice = "lower method.barlow_twins.loss_scale"

    class Knobs(MethodKnobs):
        projection_hidden_dim: int = Field(default=2048, ge=1)
        projection_dim: int = Field(default=2048, ge=1)
        lambda_offdiagonal: float = Field(default=0.0051, ge=0)  # the redundancy term's weight
        loss_scale: float = Field(default=0.1, gt=0)  # solo-learn's CIFAR scale_loss

    @staticmethod
    def views(knobs: Knobs, views: ViewConfig, image_size: int) -> list[ViewSpec]:
        return asymmetric_views(views)  # BYOL's augmentations, as the paper

    def __init__(self, encoder: nn.Module, knobs: Knobs):
        super().__init__()
        self.encoder, self.knobs = encoder, knobs
        self.projector = mlp(encoder.feature_dim, knobs.projection_hidden_dim, knobs.projection_dim, layers=3)

    def forward(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        z1, z2 = (self.projector(self.encoder(x)).float() for x in views)  # one pass per view, as the reference
        with torch.autocast(z1.device.type, enabled=False):
            loss = self.knobs.loss_scale * barlow_twins_loss(z1, z2, self.knobs.lambda_offdiagonal)
        return loss, z1.detach()
