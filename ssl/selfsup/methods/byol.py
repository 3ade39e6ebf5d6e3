"""BYOL (Grill et al., 2020): an online network with a predictor regresses an EMA target network."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from selfsup.config import MethodKnobs, ViewConfig
from selfsup.data.views import ViewSpec
from selfsup.methods.base import Method, TrainingProgress
from selfsup.methods.common import asymmetric_views
from selfsup.models.ema import EMATeacher, cosine_momentum
from selfsup.models.heads import mlp


def normalized_mse(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """||p/|p| - z/|z|||^2 = 2 - 2 cos(p, z), averaged over the batch."""
    return (2 - 2 * F.cosine_similarity(p, z, dim=1)).mean()


class BYOL(Method):
    name = "byol"
    min_batch = 2  # BatchNorm in the heads needs two images
    lr = 0.03  # per 256 images (SGD); higher rates ended below random init on the digits (docs/methods.md)

    # What to change on a NaN loss or a collapse.
    advice = "raise method.byol.momentum (a slower target)"

    class Knobs(MethodKnobs):
        momentum: float = Field(default=0.99, ge=0, le=1)  # target EMA, cosine to 1 (paper 0.996; CIFAR 0.99)
        projection_hidden_dim: int = Field(default=4096, ge=1)
        projection_dim: int = Field(default=256, ge=1)
        prediction_hidden_dim: int = Field(default=4096, ge=1)

    @staticmethod
    def views(knobs: Knobs, views: ViewConfig, image_size: int) -> list[ViewSpec]:
        return asymmetric_views(views)

    def __init__(self, encoder: nn.Module, knobs: Knobs):
        super().__init__()
        self.encoder, self.knobs = encoder, knobs
        self.projector = mlp(encoder.feature_dim, knobs.projection_hidden_dim, knobs.projection_dim)
        self.predictor = mlp(knobs.projection_dim, knobs.prediction_hidden_dim, knobs.projection_dim)
        self.teacher = EMATeacher(self.encoder, self.projector)  # the predictor is online only

    def forward(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        # Each view in its own pass, as the reference does: BatchNorm statistics per view (mmselfsup #65).
        z1, z2 = (self.projector(self.encoder(x)) for x in views)
        p1, p2 = self.predictor(z1).float(), self.predictor(z2).float()
        t1, t2 = (self.teacher(x).float() for x in views)
        with torch.autocast(p1.device.type, enabled=False):
            loss = normalized_mse(p1, t2) + normalized_mse(p2, t1)  # symmetric: each view predicts the other
        return loss, z1.detach().float()

    def after_step(self, progress: TrainingProgress) -> None:
        self.teacher.update(
            self.encoder, self.projector, momentum=cosine_momentum(self.knobs.momentum, progress.fraction)
        )
