"""The methods' cross-worker statistics over two real gloo processes equal one process holding the whole batch:
Barlow Twins' correlation loss (value and gradients), SwAV's Sinkhorn codes, DINO's centre, MoCo's shared queue;
and every whole method's training steps."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from selfsup.data.views import make_views
from selfsup.methods import METHODS, TrainingProgress, build_method, method_views
from selfsup.methods.barlow_twins import barlow_twins_loss
from selfsup.methods.swav import sinkhorn
from selfsup.models.batchnorm import convert_to_global_batchnorm
from selfsup.params import learning_rate, load_params
from selfsup.train.loop import PretrainSpec, build_model
from selfsup.train.optim import build_optimizer
from selfsup.train.step import TrainStep
from tests.conftest import TEST_IMAGES, method_inputs
from tests.unit.methods.test_method_losses import SMALL_KNOBS, TinyEncoder

WORLD = 2
TIMEOUT_S = 60


def _run(rank: int, worker, init_file: str, args: tuple, results) -> None:
    torch.set_num_threads(1)  # two processes on two shared cores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results[rank] = worker(rank, *args)
    finally:
        dist.destroy_process_group()


def spawn(worker, tmp_path, *args) -> dict:
    """worker(rank, *args) in WORLD gloo processes; returns {rank: what it returned}.

    Forked, not spawned: the children start with torch and selfsup already imported (seconds saved per test on
    two shared cores). Safe here: no CUDA, and tensors far below OpenMP's grain size.
    """
    with mp.Manager() as manager:
        results = manager.dict()
        context = mp.start_processes(
            _run, args=(worker, str(tmp_path / "init"), args, results), nprocs=WORLD, join=False, start_method="fork"
        )
        deadline = time.monotonic() + TIMEOUT_S
        while not context.join(timeout=1):  # raises if a worker failed
            if time.monotonic() > deadline:  # a hung collective must fail the test, not stall the suite
                for process in context.processes:
                    process.kill()
                raise TimeoutError(f"{worker.__name__} did not finish in {TIMEOUT_S} s")
        return dict(results)


def build(name: str, **knobs):
    torch.manual_seed(0)  # identical initial weights (and MoCo queue) on every rank, as DDP's broadcast makes them
    params = load_params({"method": {"name": name, name: {**SMALL_KNOBS[name], **knobs}}})
    return build_method(TinyEncoder(), params.method, num_classes=10, num_images=TEST_IMAGES)


# ------------------------------------------------------------------------------------------- Barlow Twins

N, DIM, LAMBDA = 3, 4, 0.3


def _barlow_worker(rank: int, z1: torch.Tensor, z2: torch.Tensor):
    local = slice(rank * N, (rank + 1) * N)
    a, b = z1[local].clone().requires_grad_(), z2[local].clone().requires_grad_()
    loss = barlow_twins_loss(a, b, LAMBDA)
    loss.backward()
    return loss.detach(), a.grad, b.grad


def test_barlow_twins_loss_and_gradients_over_two_ranks_equal_one_process(tmp_path):
    generator = torch.Generator().manual_seed(0)
    z1 = torch.randn(WORLD * N, DIM, generator=generator, dtype=torch.float64)
    z2 = torch.randn(WORLD * N, DIM, generator=generator, dtype=torch.float64) + z1  # correlated views
    results = spawn(_barlow_worker, tmp_path, z1, z2)

    full1, full2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    full_loss = barlow_twins_loss(full1, full2, LAMBDA)
    full_loss.backward()

    # Every rank computes the same global loss L (global mean, variance and correlation, summed over ranks).
    for rank in range(WORLD):
        torch.testing.assert_close(results[rank][0], full_loss.detach())
    # Gradients: each all-reduce's backward sums the incoming gradient over the ranks. Every rank sends the
    # same dL/dC (its loss is the same L), so the gradient reaching rank r's rows is WORLD * dL/dz_r: the
    # gradient of the sum of the WORLD identical losses. DDP then averages the parameter gradients over the
    # ranks, (1/WORLD) * sum_r WORLD * dL/dtheta|_r = dL/dtheta, the one-process gradient. Hence the relation:
    #     rank r's input gradient = WORLD * (one-process gradient of L w.r.t. rank r's rows).
    # (An all-reduce without a backward, lightly #1977, would give 1/WORLD of that and fail here.)
    for rank in range(WORLD):
        local = slice(rank * N, (rank + 1) * N)
        torch.testing.assert_close(results[rank][1], WORLD * full1.grad[local])
        torch.testing.assert_close(results[rank][2], WORLD * full2.grad[local])


# --------------------------------------------------------------------------------------------------- SwAV

IMAGES, PROTOTYPES, EPSILON, ITERATIONS = 3, 5, 0.05, 3


def _sinkhorn_worker(rank: int, scores: torch.Tensor):
    return sinkhorn(scores[rank * IMAGES : (rank + 1) * IMAGES], EPSILON, ITERATIONS)


def test_sinkhorn_codes_over_two_ranks_are_the_rows_of_the_one_process_codes(tmp_path):
    generator = torch.Generator().manual_seed(1)
    z = F.normalize(torch.randn(WORLD * IMAGES, 6, generator=generator), dim=1)
    scores = z @ F.normalize(torch.randn(PROTOTYPES, 6, generator=generator), dim=1).T
    results = spawn(_sinkhorn_worker, tmp_path, scores)

    # Equipartition is over the global batch: the prototype sums are all-reduced in every iteration.
    full = sinkhorn(scores, EPSILON, ITERATIONS)
    for rank in range(WORLD):
        torch.testing.assert_close(results[rank], full[rank * IMAGES : (rank + 1) * IMAGES], rtol=1e-5, atol=1e-7)
    # Per-rank Sinkhorn (no all-reduce) would differ: the comparison above can fail.
    assert not torch.allclose(sinkhorn(scores[:IMAGES], EPSILON, ITERATIONS), full[:IMAGES], rtol=1e-3)


# --------------------------------------------------------------------------------------------------- DINO

# Unequal rows per rank on purpose: the centre is the mean over every row, not the mean of the ranks' means.
DINO_ROWS = (slice(0, 2), slice(2, 7))
CENTER_MOMENTUM = 0.8


def _center_worker(rank: int, teacher_outputs: torch.Tensor, c0: torch.Tensor):
    dino = build("dino", center_momentum=CENTER_MOMENTUM)
    dino.center.copy_(c0)
    mine = teacher_outputs[DINO_ROWS[rank]]
    dino.update_center(mine.sum(0, keepdim=True), len(mine))
    return dino.center.clone()


def test_dino_center_over_two_ranks_is_identical_and_equals_the_one_process_update(tmp_path):
    output_dim = SMALL_KNOBS["dino"]["output_dim"]
    teacher_outputs = torch.randn(7, output_dim, generator=torch.Generator().manual_seed(2))
    c0 = torch.linspace(-1, 1, output_dim)[None]
    results = spawn(_center_worker, tmp_path, teacher_outputs, c0)

    one = build("dino", center_momentum=CENTER_MOMENTUM)
    one.center.copy_(c0)
    one.update_center(teacher_outputs.sum(0, keepdim=True), len(teacher_outputs))
    assert torch.equal(results[0], results[1])
    torch.testing.assert_close(results[0], one.center)
    torch.testing.assert_close(results[0], CENTER_MOMENTUM * c0 + (1 - CENTER_MOMENTUM) * teacher_outputs.mean(0))


# --------------------------------------------------------------------------------------------------- MoCo

BATCH, QUEUE = 2, 12


def _moco_worker(rank: int):
    moco = build("moco", queue_size=QUEUE)
    initial = moco.queue.clone()
    generator = torch.Generator().manual_seed(100 + rank)  # each rank its own images
    views = [torch.rand(BATCH, 3, 8, 8, generator=generator) for _ in range(2)]
    loss, _ = moco(views)
    loss.backward()
    keys = [k.clone() for k in moco._keys]  # this rank's keys per view, queued by after_step through all_gather
    moco.after_step(TrainingProgress(step=0, total_steps=10, steps_per_epoch=5))
    return initial, keys, moco.queue.clone(), int(moco.queue_end)


def test_moco_after_step_gives_every_rank_the_same_queue_with_each_views_keys_in_rank_order(tmp_path):
    results = spawn(_moco_worker, tmp_path)
    (initial0, keys0, queue0, end0), (initial1, keys1, queue1, end1) = results[0], results[1]
    assert torch.equal(initial0, initial1)
    assert not torch.allclose(keys0[0], keys1[0])  # the ranks did see different images
    # View by view, rank 0's BATCH keys then rank 1's: the order of one process holding both ranks' images.
    gathered = torch.cat([torch.cat([view0, view1]) for view0, view1 in zip(keys0, keys1)])
    assert torch.equal(queue0, queue1) and end0 == end1 == len(gathered)
    torch.testing.assert_close(queue0[: len(gathered)], gathered, rtol=0, atol=0)
    torch.testing.assert_close(queue0[len(gathered) :], initial0[len(gathered) :], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- whole methods

WHOLE_BATCH, STEPS = 8, 2


def _whole_spec(name: str) -> PretrainSpec:
    params = load_params(
        {
            "method": {"name": name, name: SMALL_KNOBS[name]},
            "model": {"width": 0.25},
            "train": {"batch_size": WHOLE_BATCH, "epochs": 2, "warmup_epochs": 0},
        }
    )
    return PretrainSpec(params.model, params.method, params.views, params.train, [0.5] * 3, [0.25] * 3, 16, 10)


def _fixed_views(name: str) -> list[list[torch.Tensor]]:
    """The views of STEPS batches, made once: every rank takes its half of the very views one process takes."""
    spec, generator = _whole_spec(name), torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (STEPS, WHOLE_BATCH, 16, 16, 3), dtype=torch.uint8, generator=generator)
    views = method_views(spec.method, spec.views, 16)
    return [make_views(batch, views, generator) for batch in images]


def _train_steps(name: str, views: list[list[torch.Tensor]], rank: int | None) -> tuple[list[float], dict]:
    """STEPS optimiser steps of the whole method, as a worker of train_loop takes them (rank None: one process)."""
    spec = _whole_spec(name)
    method = build_model(spec, num_images=WHOLE_BATCH)
    model = method
    inputs = method_inputs(name, WHOLE_BATCH)  # the supervised reference's labels, Exemplar's indices
    if rank is not None:  # as train_loop does with several CPU workers
        convert_to_global_batchnorm(method)
        model = DistributedDataParallel(method)
        views = [[view.chunk(WORLD)[rank] for view in batch] for batch in views]
        inputs = {key: value.chunk(WORLD)[rank] for key, value in inputs.items()}
    optimizer = build_optimizer(method, spec.train, learning_rate(spec.train, spec.method))
    step = TrainStep(model, optimizer, [], spec.train, torch.device("cpu"), method=method)
    losses = [step.update(batch, TrainingProgress(i, STEPS, 1), **inputs)[0].item() for i, batch in enumerate(views)]
    return losses, {key: value.clone() for key, value in method.state_dict().items()}


def _whole_method_worker(rank: int, name: str, views: list[list[torch.Tensor]]):
    return _train_steps(name, views, rank)


@pytest.mark.parametrize("method", list(METHODS))
def test_two_workers_take_the_same_steps_as_one_process_with_the_whole_batch(tmp_path, method: str):
    """Loss (the workers' mean) and every weight, teacher, queue, centre and BatchNorm statistic after two
    steps: the methods' gathers and all-reduces, global BatchNorm and DDP's gradient mean together make two
    workers one batch, as the papers define the loss."""
    views = _fixed_views(method)
    one_losses, one_state = _train_steps(method, views, rank=None)
    ranks = spawn(_whole_method_worker, tmp_path, method, views)
    for step in range(STEPS):
        mean_loss = sum(ranks[r][0][step] for r in range(WORLD)) / WORLD
        assert mean_loss == pytest.approx(one_losses[step], rel=1e-4, abs=1e-5), f"step {step}"
    for rank in range(WORLD):
        state = ranks[rank][1]
        for key, expected in one_state.items():
            torch.testing.assert_close(state[key], expected, rtol=1e-4, atol=1e-5, msg=lambda m: f"{key}: {m}")
