"""The MLP heads methods put on top of the encoder (projectors, predictors), built one way."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def mlp(
    in_dim: int,
    hidden_dim: int,
    out_dim: int,
    layers: int = 2,
    batch_norm: bool = True,
    last_batch_norm: bool = False,
    activation: type[nn.Module] = nn.ReLU,
) -> nn.Sequential:
    """`layers` Linear layers; every hidden one followed by [BatchNorm] and the activation.

    `last_batch_norm` adds an affine-free BatchNorm on the output (SimSiam's projector). Hidden
    Linear layers have no bias when a BatchNorm follows them: its shift makes the bias redundant.
    """
    modules: list[nn.Module] = []
    dims = [in_dim] + [hidden_dim] * (layers - 1) + [out_dim]
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == layers - 1
        modules.append(nn.Linear(d_in, d_out, bias=not (batch_norm and (not last or last_batch_norm))))
        if not last:
            if batch_norm:
                modules.append(nn.BatchNorm1d(d_out))
            modules.append(activation())
    if last_batch_norm:
        modules.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*modules)


class LocalBatchNorm(nn.Module):
    """BatchNorm over this worker's rows only and without running statistics, for a layer that only ever trains
    on rows every worker holds alike (OBoW's words). Not an nn.BatchNorm: the cross-worker BatchNorm conversion
    would gather every worker's identical rows again."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, None, None, self.weight, self.bias, training=True)
