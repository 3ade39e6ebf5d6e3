"""GlobalBatchNorm over two real gloo processes equals nn.BatchNorm over the whole batch in one process."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from selfsup.models import batchnorm
from selfsup.models.batchnorm import GlobalBatchNorm, convert_to_global_batchnorm

WORLD, N = 2, 4  # processes, samples per process


def _reference_model() -> nn.Sequential:
    """conv + BatchNorm2d + linear + BatchNorm1d, with affine parameters away from their 1 and 0 defaults."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5), nn.BatchNorm1d(5)
    )
    with torch.no_grad():
        for norm in (model[1], model[5]):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    return model


def _loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The mean over the samples at hand: each rank's loss is the mean over its own half."""
    return (outputs - targets).square().sum(dim=1).mean()


def _worker(rank: int, init_file: str, inputs, targets, uneven_inputs, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = convert_to_global_batchnorm(_reference_model())
        local = slice(rank * N, (rank + 1) * N)
        x = inputs[local].clone().requires_grad_()
        outputs = model(x)
        _loss(outputs, targets[local]).backward()
        with torch.no_grad():
            # A second training batch, split 3 + 5: the global count is not world size x local count.
            uneven = model(uneven_inputs[:3] if rank == 0 else uneven_inputs[3:])
            model.eval()
            evaluated = model(inputs[local])
        results[rank] = {
            "outputs": outputs.detach(),
            "input_grad": x.grad,
            "parameter_grads": {name: p.grad for name, p in model.named_parameters()},
            "buffers": dict(model.named_buffers()),
            "uneven": uneven,
            "evaluated": evaluated,
        }
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_match_batchnorm_on_the_whole_batch(tmp_path):
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(WORLD * N, 3, 6, 6, generator=generator)
    targets = torch.randn(WORLD * N, 5, generator=generator)
    uneven_inputs = torch.randn(WORLD * N, 3, 6, 6, generator=generator)
    with mp.Manager() as manager:
        results = manager.dict()
        args = (str(tmp_path / "init"), inputs, targets, uneven_inputs, results)
        mp.spawn(_worker, args=args, nprocs=WORLD, join=True)
        results = [results[rank] for rank in range(WORLD)]

    reference = _reference_model()
    x = inputs.clone().requires_grad_()
    outputs = reference(x)
    _loss(outputs, targets).backward()  # the mean over the whole batch: the mean of the ranks' losses
    with torch.no_grad():
        uneven = reference(uneven_inputs)
        reference.eval()
        evaluated = reference(inputs)

    torch.testing.assert_close(torch.cat([r["outputs"] for r in results]), outputs.detach())
    # Through the all-reduces' backward, each rank's input gradient is that of the sum of all ranks' losses,
    # WORLD times the whole batch's mean loss (the ranks' halves are equal): divided by WORLD, it is the
    # one-process gradient of its half.
    for rank, result in enumerate(results):
        torch.testing.assert_close(result["input_grad"] / WORLD, x.grad[rank * N : (rank + 1) * N])
    # Each rank's parameter gradient is the part of d(sum of the ranks' losses)/d(parameter) that flows through
    # its own samples; summed over ranks, it is WORLD times the one-process gradient, so DDP's average is it.
    for name, parameter in reference.named_parameters():
        averaged = sum(r["parameter_grads"][name] for r in results) / WORLD
        torch.testing.assert_close(averaged, parameter.grad, msg=name)
    torch.testing.assert_close(torch.cat([r["uneven"] for r in results]), uneven)
    for result in results:  # the same running statistics on every rank, after two batches
        for name, buffer in reference.named_buffers():
            torch.testing.assert_close(result["buffers"][name], buffer, msg=name)
    torch.testing.assert_close(torch.cat([r["evaluated"] for r in results]), evaluated)


def _twins(num_features: int, **settings) -> tuple[nn.Module, GlobalBatchNorm]:
    """An nn.BatchNorm and a GlobalBatchNorm with the same non-default affine parameters."""
    torch.manual_seed(0)
    reference = nn.BatchNorm2d(num_features, **settings)
    if reference.affine:
        with torch.no_grad():
            reference.weight.uniform_(0.5, 1.5)
            reference.bias.uniform_(-0.5, 0.5)
    return reference, convert_to_global_batchnorm(copy.deepcopy(reference))


def _assert_same_steps(reference: nn.Module, norm: nn.Module, inputs: list[torch.Tensor]) -> None:
    """Training steps on each input, then eval on the first: outputs, gradients and buffers equal."""
    for x in inputs:
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        expected, actual = reference(a), norm(b)
        torch.testing.assert_close(actual, expected)
        weights = torch.randn_like(expected)
        (expected * weights).sum().backward()
        (actual * weights).sum().backward()
        torch.testing.assert_close(b.grad, a.grad)
    for (name, expected), actual in zip(reference.named_parameters(), norm.parameters()):
        torch.testing.assert_close(actual.grad, expected.grad, msg=name)
    for (name, expected), actual in zip(reference.named_buffers(), norm.buffers()):
        torch.testing.assert_close(actual, expected, msg=name)
    reference.eval(), norm.eval()
    torch.testing.assert_close(norm(inputs[0]), reference(inputs[0]))


def test_single_process_is_batchnorm2d():
    reference, norm = _twins(4)
    _assert_same_steps(reference, norm, [torch.randn(8, 4, 5, 5), torch.randn(6, 4, 5, 5)])


@pytest.fixture
def world_of_one(tmp_path, monkeypatch):
    """A one-process gloo group, and GlobalBatchNorm told it is distributed: its own global-statistics path
    runs (the all-reduces are identities), to check it against nn.BatchNorm in every setting, cheaply."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    monkeypatch.setattr(batchnorm, "_distributed", lambda: True)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("shape", [(8, 3), (8, 3, 7), (8, 3, 5, 5)])
@pytest.mark.parametrize("settings", [{}, {"affine": False}, {"momentum": None}, {"track_running_stats": False}])
def test_global_statistics_path_matches_batchnorm(world_of_one, shape, settings):
    reference, norm = _twins(shape[1], **settings)
    # nn.BatchNorm2d only takes 4-D inputs; the computation is the same for any, so check its input dims away.
    reference._check_input_dim = lambda input: None
    _assert_same_steps(reference, norm, [torch.randn(shape), torch.randn(shape) * 3 + 1])


def test_global_statistics_stay_exact_for_a_large_mean(world_of_one):
    """E[x^2] - E[x]^2 in float32 would lose the variance here (mean^2 / var = 1e8; it gives tens instead of
    1); two passes keep it to float32's resolution of the inputs (1e-3 at 1e4)."""
    x = torch.randn(64, 3, 4, 4, generator=torch.Generator().manual_seed(0)) + 1e4
    norm = GlobalBatchNorm(3, momentum=1.0)  # the running statistics are the batch's
    expected = nn.BatchNorm2d(3, momentum=1.0).double()
    torch.testing.assert_close(norm(x).double(), expected(x.double()), rtol=0, atol=1e-3)
    torch.testing.assert_close(norm.running_var.double(), expected.running_var, rtol=1e-5, atol=0)


def test_global_statistics_need_more_than_one_value_per_channel(world_of_one):
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        GlobalBatchNorm(3)(torch.randn(1, 3))


def test_convert_keeps_settings_tensors_and_state_dict():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4, eps=1e-3, momentum=0.2),
        nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.BatchNorm1d(5, affine=False, momentum=None)),
    )
    model(torch.randn(8, 3, 3, 3))  # running statistics away from their initial values
    model[2][2].eval()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    tensors = dict(model.state_dict(keep_vars=True))

    converted = convert_to_global_batchnorm(model)
    assert converted is model
    norm, inner_norm = converted[1], converted[2][2]
    assert type(norm) is GlobalBatchNorm and type(inner_norm) is GlobalBatchNorm
    assert (norm.eps, norm.momentum, norm.affine, norm.track_running_stats) == (1e-3, 0.2, True, True)
    assert (inner_norm.momentum, inner_norm.affine, inner_norm.training) == (None, False, False)
    # The very same tensors: an optimiser built on the model before the conversion still updates it.
    assert all(converted.state_dict(keep_vars=True)[name] is tensor for name, tensor in tensors.items())
    assert converted.state_dict().keys() == before.keys()
    for name, tensor in converted.state_dict().items():
        torch.testing.assert_close(tensor, before[name], rtol=0, atol=0, msg=name)

    fresh = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.BatchNorm1d(5, affine=False)),
    )
    fresh.load_state_dict(converted.state_dict())  # a checkpoint of the converted model loads unconverted ...
    convert_to_global_batchnorm(fresh).load_state_dict(model.state_dict())  # ... and the other way round


def test_convert_replaces_a_top_level_batchnorm_and_leaves_global_ones():
    norm = convert_to_global_batchnorm(nn.BatchNorm1d(3))
    assert type(norm) is GlobalBatchNorm
    assert convert_to_global_batchnorm(norm) is norm
