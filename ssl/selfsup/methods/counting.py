"""Counting (Noroozi et al., 2017): the "count" of visual primitives in an image, downsampled, equals the sum
of its four tiles' counts; another image's count must differ by at least a margin.

A pretext task: phi = ReLU(head(encoder(.))) is the count vector; D halves the image's side (2x2 average
pooling) and T_1..T_4 are its quadrants, so all five inputs share one side and one encoder pass. The loss,
per image x with another image y of the batch (the next one, across every worker), per count dimension d:

    mean over x and d of  (phi_d(D x) - sum_j phi_d(T_j x))^2 + max(0, M - (phi_d(D y) - sum_j phi_d(T_j x))^2)

The paper writes both terms with the squared norm over all dimensions. Taken that way (M = 10 over 1000
counts) the counts died at zero within the first epoch on the digits: the loss sat at exactly M, where the
hinge has no gradient, and the encoder was squeezed to kNN 64.6%. The hinge per dimension, as the public
reimplementation (clvrai/Representation-Learning-by-Learning-to-Count) has it, keeps every count apart:
kNN 89.4% at M = 1 through the pipeline (in one process at 20 epochs: 90.8% at M = 1, 77.7% at M = 10). It
still trails random init there (92.8%), and more epochs hurt it: the additive constraint is easiest met by a
low-rank encoder.

Adapted to small images: the paper's 114 px tiles of 228 px images become 8 px of 16 px (16 of 32), and
its 1000 counts on AlexNet `count_dim` (default 1000) on our backbones. Feeding the encoder its evaluation
resolution instead (the image whole, the tiles upsampled) cost twice the compute and did no better.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from selfsup.config import MethodKnobs
from selfsup.distributed import gather_with_grad, rank
from selfsup.methods.common import one_view
from selfsup.models.heads import mlp


def downsampled_and_tiles(images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """N x C x H x W (H, W even) -> (D x: N x C x H/2 x W/2, the four quadrants T_1..T_4 of that size)."""
    h, w = images.shape[2] // 2, images.shape[3] // 2
    tiles = [images[:, :, :h, :w], images[:, :, :h, w:], images[:, :, h:, :w], images[:, :, h:, w:]]
    return F.avg_pool2d(images, 2), tiles


def counting_loss(whole: torch.Tensor, tiles_sum: torch.Tensor, other: torch.Tensor, margin: float) -> torch.Tensor:
    """Mean over images and count dimensions of (whole - tiles_sum)^2 + max(0, margin - (other - tiles_sum)^2)."""
    return ((whole - tiles_sum).pow(2) + F.relu(margin - (other - tiles_sum).pow(2))).mean()


class Counting(nn.Module):
    name = "counting"
    min_batch = 2  # the other image is another image of the batch
    lr = 0.1  # per 256 images (SGD)

    advice = "lower train.lr or method.counting.margin"

    class Knobs(MethodKnobs):
        count_dim: int = Field(default=1000, ge=1)
        head_hidden_dim: int = Field(default=1024, ge=1)
        margin: float = Field(default=1.0, gt=0)  # M, per count dimension (the paper's 10 is over the norm)

    views = staticmethod(one_view)

    def __init__(self, encoder: nn.Module, knobs: Knobs):
        super().__init__()
        self.encoder, self.knobs = encoder, knobs
        self.head = mlp(encoder.feature_dim, knobs.head_hidden_dim, knobs.count_dim)

    def forward(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        whole, tiles = downsampled_and_tiles(views[0])
        features = self.encoder(torch.cat([whole, *tiles]))  # five inputs of one size: one pass
        counts = F.relu(self.head(features)).float().chunk(5)
        n = whole.shape[0]
        with torch.autocast(features.device.type, enabled=False):
            tiles_sum = sum(counts[1:])
            # The next image's count, over the global batch: the same pairs however many workers share it.
            other = gather_with_grad(counts[0]).roll(-1, dims=0)[rank() * n : (rank() + 1) * n]
            loss = counting_loss(counts[0], tiles_sum, other, self.knobs.margin)
        return loss, features[:n].detach().float()
