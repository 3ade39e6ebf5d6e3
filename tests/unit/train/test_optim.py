"""Optimisers: LARS against a hand computation, the no-decay/no-adaptation group, fixed-LR groups, resuming."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from selfsup.config import TrainConfig
from selfsup.train.optim import build_optimizer, set_lr

MOMENTUM, WEIGHT_DECAY, ETA = 0.9, 0.1, 0.02


class TinyModel(nn.Module):
    """A weight, a bias and a BatchNorm; `head` is held at a fixed LR when asked."""

    def __init__(self, fixed_head: bool = False):
        super().__init__()
        self.linear = nn.Linear(3, 4)
        self.norm = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 2)
        self.fixed_head = fixed_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.linear(x)))

    def fixed_lr_parameters(self):
        return self.head.parameters() if self.fixed_head else ()


def _config(optimizer: str = "lars", lr: float = 0.5) -> TrainConfig:
    return TrainConfig(
        optimizer=optimizer, lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, lars_trust_coefficient=ETA
    )


def _build(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    return build_optimizer(model, config, config.lr)


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(step))
    optimizer.zero_grad()
    model(x).square().mean().backward()
    optimizer.step()


def _trust_ratio(weight: torch.Tensor, grad: torch.Tensor) -> float:
    return (ETA * weight.norm() / (grad.norm() + WEIGHT_DECAY * weight.norm())).item()


# lr 0.5 is above the adapted LR (trust ratio ~0.04), which stays as it is; lr 1e-4 is below it, so LARC's clip
# (trust ratio / lr, at most 1) makes the step plain SGD with weight decay.
@pytest.mark.parametrize("lr, clipped", [(0.5, False), (1e-4, True)])
def test_lars_steps_weights_as_computed_by_hand(lr, clipped):
    model = TinyModel()
    optimizer = _build(model, _config(lr=lr))
    weight = model.linear.weight
    expected, momentum_buffer = weight.detach().clone(), None
    for step in range(2):
        _train_step(model, optimizer, step)
        trust_ratio = _trust_ratio(expected, weight.grad)
        assert (trust_ratio / lr > 1) == clipped
        update = (weight.grad + WEIGHT_DECAY * expected) * min(trust_ratio / lr, 1.0)
        momentum_buffer = update if momentum_buffer is None else MOMENTUM * momentum_buffer + update
        expected = expected - lr * momentum_buffer
        torch.testing.assert_close(weight.detach(), expected)


def test_lars_gives_biases_and_norm_parameters_plain_sgd_momentum_steps():
    model, lr = TinyModel(), 0.5
    optimizer = _build(model, _config(lr=lr))
    plain = [model.linear.bias, model.norm.weight, model.norm.bias]
    expected = [p.detach().clone() for p in plain]
    buffers = [torch.zeros_like(p) for p in plain]
    for step in range(2):
        _train_step(model, optimizer, step)
        for parameter, value, buffer in zip(plain, expected, buffers):
            buffer.mul_(MOMENTUM).add_(parameter.grad)  # no adaptation, no weight decay
            value.sub_(lr * buffer)
            torch.testing.assert_close(parameter.detach(), value)


@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw", "lars"])
def test_groups_split_decay_and_fixed_lr(optimizer_name):
    model = TinyModel(fixed_head=True)
    optimizer = _build(model, _config(optimizer_name))
    groups = [
        ([id(p) for p in g["params"]], g["weight_decay"], g.get("fixed_lr", False)) for g in optimizer.param_groups
    ]
    assert groups == [
        ([id(model.linear.weight)], WEIGHT_DECAY, False),
        ([id(model.linear.bias), id(model.norm.weight), id(model.norm.bias)], 0.0, False),
        ([id(model.head.weight)], WEIGHT_DECAY, True),
        ([id(model.head.bias)], 0.0, True),
    ]
    if optimizer_name == "lars":  # the weights adapt even where weight decay is 0; biases and norms never
        assert [g["always_adapt"] for g in optimizer.param_groups] == [True, False, True, False]


def test_without_fixed_lr_parameters_there_are_only_the_two_usual_groups():
    assert len(_build(TinyModel(), _config()).param_groups) == 2


def test_set_lr_leaves_fixed_groups_at_the_base_lr():
    optimizer = _build(TinyModel(fixed_head=True), _config(lr=0.5))
    set_lr(optimizer, 0.01)
    assert [g["lr"] for g in optimizer.param_groups] == [0.01, 0.01, 0.5, 0.5]


@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw", "lars"])
def test_state_dict_round_trip_resumes_exactly(optimizer_name):
    config = _config(optimizer_name)
    torch.manual_seed(0)
    uninterrupted = TinyModel(fixed_head=True)
    interrupted = copy.deepcopy(uninterrupted)

    optimizer = _build(uninterrupted, config)
    for step in range(4):
        set_lr(optimizer, 0.5 / (step + 1))
        _train_step(uninterrupted, optimizer, step)

    optimizer = _build(interrupted, config)
    for step in range(2):
        set_lr(optimizer, 0.5 / (step + 1))
        _train_step(interrupted, optimizer, step)
    checkpoint = copy.deepcopy({"model": interrupted.state_dict(), "optimizer": optimizer.state_dict()})
    resumed = TinyModel(fixed_head=True)
    resumed.load_state_dict(checkpoint["model"])
    optimizer = _build(resumed, config)
    optimizer.load_state_dict(checkpoint["optimizer"])
    for step in range(2, 4):
        set_lr(optimizer, 0.5 / (step + 1))
        _train_step(resumed, optimizer, step)

    for name, parameter in uninterrupted.named_parameters():
        torch.testing.assert_close(resumed.get_parameter(name), parameter, rtol=0, atol=0)
