"""NT-Xent over two real gloo processes equals NT-Xent over the whole batch in one process."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from selfsup.methods import nt_xent_loss

WORLD, N, DIM, TEMPERATURE = 2, 4, 8, 0.3


def _worker(rank: int, init_file: str, z1: torch.Tensor, z2: torch.Tensor, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        local = slice(rank * N, (rank + 1) * N)
        a, b = z1[local].clone().requires_grad_(), z2[local].clone().requires_grad_()
        loss = nt_xent_loss(a, b, TEMPERATURE)
        loss.backward()
        results[rank] = (loss.detach(), a.grad, b.grad)
    finally:
        dist.destroy_process_group()


def test_gathered_loss_and_gradients_match_one_process(tmp_path):
    generator = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(WORLD * N, DIM, generator=generator), torch.randn(WORLD * N, DIM, generator=generator)
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(str(tmp_path / "init"), z1, z2, results), nprocs=WORLD, join=True)
        results = dict(results)

    full1, full2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    full_loss = nt_xent_loss(full1, full2, TEMPERATURE)
    full_loss.backward()

    mean_loss = sum(results[r][0] for r in range(WORLD)) / WORLD
    torch.testing.assert_close(mean_loss, full_loss.detach())
    for rank in range(WORLD):
        local = slice(rank * N, (rank + 1) * N)
        # Each rank's gradient is that of the sum of all ranks' losses; DDP's averaging makes it the mean's.
        torch.testing.assert_close(results[rank][1] / WORLD, full1.grad[local])
        torch.testing.assert_close(results[rank][2] / WORLD, full2.grad[local])
