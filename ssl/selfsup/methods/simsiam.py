"""SimSiam (Chen & He, 2021): a predictor and a stop-gradient on the other branch; no negatives, no EMA."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from selfsup.config import MethodKnobs
from selfsup.methods.base import Method
from selfsup.methods.common import two_views
from selfsup.models.heads import mlp


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return -F.cosine_similarity(p, z, dim=1).mean()


class SimSiam(Method):
    name = "simsiam"
    min_batch = 2  # BatchNorm in the heads needs two images
    lr = 0.3  # per 256 images (SGD): above random init on the digits (docs/methods.md)

    # What to change on a NaN loss or a collapse.
    advice = "keep method.simsiam.stop_gradient and fixed_predictor_lr true, or raise train.batch_size"

    class Knobs(MethodKnobs):
        projection_dim: int = Field(default=2048, ge=1)
        projection_hidden_dim: int = Field(default=2048, ge=1)
        projector_layers: int = Field(default=2, ge=1)  # 2 on CIFAR (paper, appendix D), 3 on ImageNet
        prediction_hidden_dim: int = Field(default=512, ge=1)  # the bottleneck
        fixed_predictor_lr: bool = True  # the predictor's LR is not decayed (the paper's --fix-pred-lr)
        stop_gradient: bool = True  # the paper's ablation: false collapses

    views = staticmethod(two_views)

    def __init__(self, encoder: nn.Module, knobs: Knobs):
        super().__init__()
        self.encoder, self.knobs = encoder, knobs
        self.projector = mlp(
            encoder.feature_dim,
            knobs.projection_hidden_dim,
            knobs.projection_dim,
            layers=knobs.projector_layers,
            last_batch_norm=True,
        )
        self.predictor = mlp(knobs.projection_dim, knobs.prediction_hidden_dim, knobs.projection_dim)

    def forward(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        f1, f2 = (self.encoder(x) for x in views)  # one pass per view, as the reference
        z1, z2 = self.projector(f1), self.projector(f2)
        p1, p2 = self.predictor(z1).float(), self.predictor(z2).float()
        t1, t2 = (z.float().detach() if self.knobs.stop_gradient else z.float() for z in (z1, z2))
        with torch.autocast(p1.device.type, enabled=False):
            loss = (negative_cosine(p1, t2) + negative_cosine(p2, t1)) / 2
        # The encoder's features are watched: the projector's last BatchNorm keeps z's std at 1 even in a collapse.
        return loss, f1.detach().float()

    def fixed_lr_parameters(self):
        return self.predictor.parameters() if self.knobs.fixed_predictor_lr else ()
