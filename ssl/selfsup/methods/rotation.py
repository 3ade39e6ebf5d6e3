"""RotNet (Gidaris et al., 2018): predict by which multiple of 90 degrees each image was rotated.

A pretext task: the labels come from the transform, never from the dataset. The official recipe rotates
every image of the batch all four ways (RotNet's CIFAR config); VISSL draws one rotation per image
(`all_rotations: false`, here the i-th image of a batch turned i mod 4 times, so each batch is balanced and
batches are shuffled every epoch). Rotations keep a square image square, so 16 and 32 px images need no
adaptation.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from selfsup.config import MethodKnobs
from selfsup.methods.base import Method
from selfsup.methods.common import labelled_cross_entropy, one_view
from selfsup.models.heads import mlp

ROTATIONS = 4  # 0, 90, 180 and 270 degrees


def rotated(images: torch.Tensor, all_rotations: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(N x C x H x W) -> the rotated images and their labels k (each turned k * 90 degrees counter-clockwise).

    With `all_rotations`, 4N images: the batch turned 0, 1, 2 and 3 times, in that order; else N images, the
    i-th turned i mod 4 times.
    """
    n = images.shape[0]
    if all_rotations:
        turns = torch.arange(ROTATIONS, device=images.device).repeat_interleave(n)
        return torch.cat([torch.rot90(images, k, dims=(2, 3)) for k in range(ROTATIONS)]), turns
    turns = torch.arange(n, device=images.device) % ROTATIONS
    out = images.clone()
    for k in range(1, ROTATIONS):
        out[turns == k] = torch.rot90(images[turns == k], k, dims=(2, 3))
    return out, turns


class Rotation(Method):
    name = "rotation"
    min_batch = 2  # BatchNorm in the head needs two images
    lr = 0.1  # per 256 images (SGD): RotNet's CIFAR lr 0.1 at batch 128

    advice = "lower train.lr, or set method.rotation.all_rotations: true"

    class Knobs(MethodKnobs):
        all_rotations: bool = True  # each image four times, as the official code (false: one each, as VISSL)
        head_hidden_dim: int = Field(default=512, ge=1)

    views = staticmethod(one_view)

    def __init__(self, encoder: nn.Module, knobs: Knobs):
        super().__init__()
        self.encoder, self.knobs = encoder, knobs
        self.head = mlp(encoder.feature_dim, knobs.head_hidden_dim, ROTATIONS)

    def forward(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        images, turns = rotated(views[0], self.knobs.all_rotations)
        features = self.encoder(images)
        loss = labelled_cross_entropy(self.head, features, turns)
        return loss, features[: views[0].shape[0]].detach().float()
