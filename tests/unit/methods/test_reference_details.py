"""Details where the references were followed: SwAV's projector and DINO's head run once over every crop (their
BatchNorm sees all crops in one batch), and MoCo's symmetric loss sums its two directions (its CIFAR demo)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from selfsup.methods.moco import info_nce_loss
from tests.unit.methods.test_method_losses import build, declared_views


@pytest.mark.parametrize("name, head", [("swav", "projector"), ("dino", "head")])
@pytest.mark.parametrize("local_crops", [0, 3])
def test_the_heads_batchnorm_sees_every_crop_in_one_batch(name, head, local_crops):
    method = build(name, local_crops=local_crops)
    views = declared_views(name, n=4, local_crops=local_crops)
    assert len(views) == 2 + local_crops and (local_crops == 0 or views[-1].shape[-1] < views[0].shape[-1])
    batches = []
    norm = next(m for m in getattr(method, head).modules() if isinstance(m, nn.BatchNorm1d))
    norm.register_forward_hook(lambda module, inputs, output: batches.append(len(inputs[0])))
    method(views)
    assert batches == [4 * len(views)]  # one pass, every crop of every size


def test_moco_symmetric_loss_is_the_sum_of_both_directions():
    moco = build("moco")
    x1, x2 = declared_views("moco")
    loss, _ = moco([x1, x2])
    with torch.no_grad():
        q1, q2 = moco.projector(moco.encoder(x1)), moco.projector(moco.encoder(x2))
        k1, k2 = moco.teacher(x1), moco.teacher(x2)
        expected = info_nce_loss(q1, k2, moco.queue, 0.1) + info_nce_loss(q2, k1, moco.queue, 0.1)
    torch.testing.assert_close(loss.detach(), expected)
