"""Counting (Noroozi et al., 2017): the "count" of visual primitives in an image, downsampled, equals the sum
of its four tiles' counts; another image's count must differ.

A pretext task: phi = ReLU(head(encoder(.))) is the count vector; D halves the image's side (2x2 average
pooling) and T_1..T_4 are its quadrants, so all five inputs share one side and one encoder pass. The loss,
per image x, is the equality term, the mean over count dimensions of (phi(D x) - sum_j phi(T_j x))^2, plus a
contrastive term against other images, by `method.counting.contrast`:

- `info_nce` (the default): the cross-entropy of picking phi(D x) among every image's phi(D y) of the global
  batch by the cosine to sum_j phi(T_j x), at a temperature (SimCLR's form of "another image differs");
- `hinge`: the paper's, against one other image y (the next of the batch), per count dimension as the public
  reimplementation (clvrai/Representation-Learning-by-Learning-to-Count) has it: max(0, M - (phi_d(D y) -
  sum_j phi_d(T_j x))^2). The paper's hinge over the squared norm killed the counts at zero on the digits
  (the loss sat at M, where the hinge has no gradient).

Two departures from the paper, because its form never beat random init on the digits (docs/methods.md, "Notes
behind the code"): D x comes from one augmented view and the tiles from another, so the count cannot be met
by matching the tiles' pixels to the image's; and the contrastive term is InfoNCE over the batch. The
equality term is kept, as the method's definition, though it added nothing measured.

Adapted to small images: the paper's 114 px tiles of 228 px images become 8 px of 16 px (16 of 32), and
its 1000 counts on AlexNet `count_dim` (default 1000) on our backbones. Feeding the encoder its evaluation
resolution instead (the image whole, the tiles upsampled) cost twice the compute and, with the hinge, did no
better.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from selfsup.config import MethodKnobs
from selfsup.distributed import gather_with_grad, rank
from selfsup.methods.base import Method
from selfsup.methods.common import two_views
from selfsup.models.heads import mlp


def downsampled(images: torch.Tensor) -> torch.Tensor:
    """N x C x H x W (H, W even) -> D x: N x C x H/2 x W/2, each pixel the mean of a 2 x 2 block."""
    return F.avg_pool2d(images, 2)


def quadrants(images: torch.Tensor) -> list[torch.Tensor]:
    """N x C x H x W (H, W even) -> the four tiles T_1..T_4, N x C x H/2 x W/2, in row-major order."""
    h, w = images.shape[2] // 2, images.shape[3] // 2
    return [images[:, :, :h, :w], images[:, :, :h, w:], images[:, :, h:, :w], images[:, :, h:, w:]]


def counting_loss(whole: torch.Tensor, tiles_sum: torch.Tensor, other: torch.Tensor, margin: float) -> torch.Tensor:
    """Mean over images and count dimensions of (whole - tiles_sum)^2 + max(0, margin - (other - tiles_sum)^2)."""
    return ((whole - tiles_sum).pow(2) + F.relu(margin - (other - tiles_sum).pow(2))).mean()


def count_info_nce(whole: torch.Tensor, tiles_sum: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cross-entropy of each tiles_sum picking its own image's count among every worker's `whole` by cosine."""
    everyone = F.normalize(gather_with_grad(whole), dim=1)
    logits = F.normalize(tiles_sum, dim=1) @ everyone.T / temperature
    own = torch.arange(whole.shape[0], device=whole.device) + rank() * whole.shape[0]
    return F.cross_entropy(logits, own)


class Counting(Method):
    name = "counting"
    min_batch = 2  # the other image is another image of the batch
    lr = 0.1  # per 256 images (SGD)

    advice = "lower train.lr or raise method.counting.temperature"

    class Knobs(MethodKnobs):
        count_dim: int = Field(default=1000, ge=1)
        head_hidden_dim: int = Field(default=1024, ge=1)
        contrast: Literal["info_nce", "hinge"] = "info_nce"  # against every other image | the paper's, one
        temperature: float = Field(default=0.2, gt=0)  # info_nce; 0.5 did worse on CIFAR-10 (docs/methods.md)
        margin: float = Field(default=1.0, gt=0)  # hinge: M per count dimension (the paper's 10 is over the norm)

    views = staticmethod(two_views)  # D x from the first, the tiles from the second

    def __init__(self, encoder: nn.Module, knobs: Knobs):
        super().__init__()
        self.encoder, self.knobs = encoder, knobs
        self.head = mlp(encoder.feature_dim, knobs.head_hidden_dim, knobs.count_dim)

    def forward(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        whole, tiles = downsampled(views[0]), quadrants(views[1])
        features = self.encoder(torch.cat([whole, *tiles]))  # five inputs of one size: one pass
        counts = F.relu(self.head(features)).float().chunk(5)
        n = whole.shape[0]
        with torch.autocast(features.device.type, enabled=False):
            tiles_sum = sum(counts[1:])
            if self.knobs.contrast == "info_nce":
                equality = (counts[0] - tiles_sum).pow(2).mean()
                loss = equality + count_info_nce(counts[0], tiles_sum, self.knobs.temperature)
            else:  # the next image's count, over the global batch: the same pairs however many workers share it
                other = gather_with_grad(counts[0]).roll(-1, dims=0)[rank() * n : (rank() + 1) * n]
                loss = counting_loss(counts[0], tiles_sum, other, self.knobs.margin)
        return loss, features[:n].detach().float()
