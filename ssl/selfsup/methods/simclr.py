"""SimCLR (Chen et al., 2020): two views, an MLP projector, and the NT-Xent contrastive loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from selfsup.config import MethodKnobs
from selfsup.distributed import gather_with_grad, rank
from selfsup.methods.base import Method
from selfsup.methods.common import two_views
from selfsup.models.heads import mlp


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Normalised-temperature cross-entropy over 2N embeddings.

    Each embedding's positive is the other view of the same image; the other 2N - 2 embeddings,
    gathered from every worker, are its negatives. z1 and z2 are this worker's N x D projections.
    """
    local = torch.cat([z1, z2])  # 2n x d: rows i and i + n are views of one image
    everyone = F.normalize(gather_with_grad(local), dim=1)
    local = F.normalize(local, dim=1)
    n = z1.shape[0]
    # Row layout of `everyone`: [rank0 view1, rank0 view2, rank1 view1, ...] blocks of n.
    logits = local @ everyone.T / temperature
    own = torch.arange(2 * n, device=z1.device) + rank() * 2 * n  # each row's own column
    logits[torch.arange(2 * n), own] = float("-inf")  # an embedding is not its own negative
    positives = torch.cat([own[n:], own[:n]])
    return F.cross_entropy(logits, positives)


class SimCLR(Method):
    name = "simclr"
    min_batch = 2  # a negative needs a second image
    lr = 0.3  # per 256 images (SGD), SimCLR's 0.3 x batch/256

    # What to change on a NaN loss or a collapse.
    advice = "raise method.simclr.temperature"

    class Knobs(MethodKnobs):
        # SimCLR's own CIFAR-10 value (appendix B.9); solo-learn's 0.2 is in recipes/cifar10.yaml. On the digits
        # 0.5 beat 0.2 on every protocol (docs/methods.md).
        temperature: float = Field(default=0.5, gt=0)
        projection_hidden_dim: int = Field(default=2048, ge=1)
        projection_dim: int = Field(default=256, ge=1)

    views = staticmethod(two_views)

    def __init__(self, encoder: nn.Module, knobs: Knobs):
        super().__init__()
        self.encoder, self.knobs = encoder, knobs
        self.projector = mlp(encoder.feature_dim, knobs.projection_hidden_dim, knobs.projection_dim)

    def forward(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        # Both views in one pass: one BatchNorm statistic and half the kernel launches.
        z1, z2 = self.projector(self.encoder(torch.cat(views))).float().chunk(2)
        # In float32 even under bf16 autocast: logits / temperature need finer steps than bf16's 8 bits of mantissa.
        with torch.autocast(z1.device.type, enabled=False):
            return nt_xent_loss(z1, z2, self.knobs.temperature), z1.detach()
