"""SwAV (Caron et al., 2020): online clustering onto prototypes, codes by Sinkhorn-Knopp, swapped prediction."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from selfsup.config import CropScale, MethodKnobs, ViewConfig
from selfsup.data.views import ViewSpec
from selfsup.distributed import all_reduce_sum
from selfsup.methods.base import Method, TrainingProgress
from selfsup.methods.common import (
    cross_view_cross_entropy,
    encode_then_head,
    two_views,
    with_local_views,
)
from selfsup.models.heads import mlp


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """Codes Q (B x K) for prototype scores: each image's row sums to 1 and, over the global batch,
    the prototypes are used equally (each column sums to B/K). Sums run over every worker's images."""
    q = torch.exp(scores.float() / epsilon).T  # K x B
    prototypes = q.shape[0]
    images = all_reduce_sum(torch.tensor(float(q.shape[1]), device=q.device))
    q /= all_reduce_sum(q.sum())
    for _ in range(iterations):
        q /= all_reduce_sum(q.sum(dim=1, keepdim=True)) * prototypes  # rows: equal mass per prototype
        q /= q.sum(dim=0, keepdim=True) * images  # columns (per image, so local): equal mass per image
    return (q * images).T


def swapped_prediction_loss(scores: list[torch.Tensor], codes: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """Each assignment view's codes are predicted from every other view's scores; mean over the pairs."""
    return cross_view_cross_entropy(codes, scores, temperature)


class SwAV(Method):
    name = "swav"
    min_batch = 2  # BatchNorm in the head needs two images
    lr = 0.3  # per 256 images (SGD), as SimCLR's: chosen on the digits' val split (docs/methods.md)

    # What to change on a NaN loss or a collapse.
    advice = "lower method.swav.epsilon (0.03) or raise method.swav.freeze_prototypes_epochs"

    class Knobs(MethodKnobs):
        temperature: float = Field(default=0.1, gt=0)
        epsilon: float = Field(default=0.05, gt=0)  # Sinkhorn's entropy weight: lower is sharper (0.03 if stuck)
        sinkhorn_iterations: int = Field(default=3, ge=1)
        prototypes: int = Field(default=3000, ge=2)
        projection_hidden_dim: int = Field(default=2048, ge=1)
        projection_dim: int = Field(default=128, ge=1)
        freeze_prototypes_epochs: float = Field(default=2, ge=0)  # prototypes stay still at first
        local_crops: int = Field(default=0, ge=0)  # multi-crop: small views beside the two global ones
        local_size: float = Field(default=0.5625, gt=0, le=1)  # their side, a fraction of the image's (18/32)
        local_crop_scale: CropScale = (0.08, 0.5)  # their area range

    @staticmethod
    def views(knobs: Knobs, views: ViewConfig, image_size: int) -> list[ViewSpec]:
        two = two_views(knobs, views, image_size)
        return with_local_views(two, views, image_size, knobs.local_crops, knobs.local_size, knobs.local_crop_scale)

    def __init__(self, encoder: nn.Module, knobs: Knobs):
        super().__init__()
        self.encoder, self.knobs = encoder, knobs
        self.projector = mlp(encoder.feature_dim, knobs.projection_hidden_dim, knobs.projection_dim)
        self.prototypes = nn.Linear(knobs.projection_dim, knobs.prototypes, bias=False)
        self.normalize_prototypes()

    def forward(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        z = [F.normalize(p.float(), dim=1) for p in encode_then_head(self.encoder, self.projector, views)]
        with torch.autocast(z[0].device.type, enabled=False):  # exp(s / 0.05) overflows bf16 (swav NaNs)
            scores = [self.prototypes(view) for view in z]
            codes = [sinkhorn(s, self.knobs.epsilon, self.knobs.sinkhorn_iterations) for s in scores[:2]]
            loss = swapped_prediction_loss(scores, codes, self.knobs.temperature)
        return loss, z[0].detach()

    def after_backward(self, progress: TrainingProgress) -> None:
        if progress.epoch < self.knobs.freeze_prototypes_epochs:
            self.prototypes.weight.grad = None  # no gradient: the optimiser skips them (momentum, decay too)

    def after_step(self, progress: TrainingProgress) -> None:
        self.normalize_prototypes()

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))
