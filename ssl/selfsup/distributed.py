"""Collective helpers that degrade to no-ops in a single process (so the library runs without Ray)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x from every rank along dim 0, keeping gradients (negatives from all workers)."""
    if world_size() == 1:
        return x
    from torch.distributed._functional_collectives import all_gather_single_autograd

    # Backward is a reduce-scatter (sum): each rank's embeddings get the gradient of every rank's loss.
    return all_gather_single_autograd(x, gather_dim=0, group=dist.group.WORLD)
