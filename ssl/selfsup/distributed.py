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


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward is also a sum: every rank's loss depends on the reduced value, so
    the gradient reaching each rank's input is the sum of all ranks' gradients of the reduced value."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def all_reduce_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Sum of x over every rank, differentiable (Barlow Twins' correlation, batch statistics)."""
    return x if world_size() == 1 else _AllReduceSum.apply(x)


@torch.no_grad()
def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of x over every rank, no gradient (Sinkhorn's sums, DINO's centre)."""
    if world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
    return x


@torch.no_grad()
def all_gather(x: torch.Tensor) -> torch.Tensor:
    """x from every rank concatenated along dim 0, no gradient (MoCo's keys before they are queued)."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def rand_per_image(n: int, *shape: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniform [0, 1) draws of `shape` for each of this worker's n images: those one process holding the global
    batch would draw for them. Every worker's generator is seeded alike (train.seed), so each draws for the whole
    global batch and keeps its own slice: a pretext task's labels do not depend on how many workers share it."""
    everyone = torch.rand(n * world_size(), *shape, device=device)
    return everyone[rank() * n : (rank() + 1) * n]


def randint_per_image(high: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """One integer in [0, high) per image of this worker's n, as `rand_per_image` draws them."""
    everyone = torch.randint(high, (n * world_size(),), device=device)
    return everyone[rank() * n : (rank() + 1) * n]
