"""Optimisers and the learning-rate schedule, shared by every method."""

from __future__ import annotations

import math

import torch
from torch import nn

from selfsup.config import TrainConfig
from selfsup.methods import Method


def _decay_split(parameters: list[nn.Parameter], config: TrainConfig, **extra) -> list[dict]:
    """A group of weights (weight decay; LARS-adapted) and one of biases and norm parameters (neither)."""
    weights = [p for p in parameters if p.ndim > 1]
    biases_and_norms = [p for p in parameters if p.ndim <= 1]
    lars = config.optimizer == "lars"
    # timm's Lars adapts only groups with weight decay unless always_adapt: set it per group so that the
    # weights stay adapted even with train.weight_decay 0, and biases and norms never are (solo-learn's
    # exclude_bias_n_norm).
    adapt, no_adapt = ({"always_adapt": True}, {"always_adapt": False}) if lars else ({}, {})
    return [
        {"params": weights, "weight_decay": config.weight_decay, **adapt, **extra},
        {"params": biases_and_norms, "weight_decay": 0.0, **no_adapt, **extra},
    ]


def build_optimizer(model: Method, config: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """SGD (momentum), AdamW or LARS; biases and norm weights get no weight decay (nor LARS adaptation), as is
    usual for SSL. Parameters the method keeps at a fixed learning rate (its `fixed_lr_parameters()`) get
    groups of their own, marked "fixed_lr", which `set_lr` leaves at `lr`, the peak learning rate."""
    fixed_ids = {id(p) for p in model.fixed_lr_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    scheduled = [p for p in trainable if id(p) not in fixed_ids]
    fixed = [p for p in trainable if id(p) in fixed_ids]
    groups = _decay_split(scheduled, config)  # always both groups: the layout older checkpoints have
    groups += [group for group in _decay_split(fixed, config, fixed_lr=True) if group["params"]]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if config.optimizer == "lars":
        from timm.optim import Lars  # here: importing timm takes seconds (it loads its model zoo)

        # trust_clip: the adapted LR never exceeds the scheduled one (LARC clipping, solo-learn's clip_lr).
        return Lars(groups, lr=lr, momentum=config.momentum, trust_coeff=config.lars_trust_coefficient, trust_clip=True)
    return torch.optim.SGD(groups, lr=lr, momentum=config.momentum)


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, base_lr: float) -> float:
    """Linear warm-up to base_lr, then cosine decay to zero at total_steps."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Sets every group's LR but the fixed-LR groups', which keep the base LR they were built with."""
    for group in optimizer.param_groups:
        if not group.get("fixed_lr", False):
            group["lr"] = lr
