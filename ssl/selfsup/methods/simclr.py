"""SimCLR (Chen et al., 2020): two views, an MLP projector, and the NT-Xent contrastive loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.config import MethodConfig
from selfsup.distributed import gather_with_grad, rank
from selfsup.models import Encoder


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


class SimCLR(nn.Module):
    def __init__(self, encoder: Encoder, config: MethodConfig):
        super().__init__()
        self.encoder = encoder
        self.temperature = config.temperature
        self.projector = nn.Sequential(
            nn.Linear(encoder.feature_dim, config.projection_hidden_dim),
            nn.BatchNorm1d(config.projection_hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(config.projection_hidden_dim, config.projection_dim),
        )

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        # Both views in one pass: one BatchNorm statistic and half the kernel launches.
        z = self.projector(self.encoder(torch.cat(views)))
        z1, z2 = z.float().chunk(2)
        # In float32 even under bf16 autocast: logits / 0.2 need finer steps than bf16's 8 bits of mantissa.
        with torch.autocast(z.device.type, enabled=False):
            return nt_xent_loss(z1, z2, self.temperature)
