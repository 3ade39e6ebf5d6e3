"""The random-init baseline's BatchNorm statistics, re-estimated on the training images: they equal the batch
statistics of a forward pass over those images, and they change the baseline's features."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from selfsup.config import ModelConfig
from selfsup.data.views import to_float_images
from selfsup.eval.features import extract_features, reestimate_batchnorm
from selfsup.models import Encoder


def images(n: int = 96, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 16, 16, 3), dtype=np.uint8)


def encoder(seed: int = 0) -> Encoder:
    torch.manual_seed(seed)
    return Encoder(ModelConfig(), mean=[0.5] * 3, std=[0.25] * 3, image_size=16)


def batch_statistics_of_a_forward_pass(model: Encoder, data: np.ndarray) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each BatchNorm's input mean and (unbiased) variance per channel, for one train-mode pass over `data`."""
    seen = []

    def record(module, inputs, output):
        x = inputs[0].transpose(0, 1).flatten(1)  # channels x everything else
        seen.append((x.mean(1), x.var(1, unbiased=True)))

    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    handles = [m.register_forward_hook(record) for m in norms]
    with torch.no_grad():
        model.train()(to_float_images(torch.as_tensor(data)))
    for handle in handles:
        handle.remove()
    return seen


def test_reestimated_statistics_equal_the_training_images_batch_statistics():
    data = images()
    model = encoder()
    expected = batch_statistics_of_a_forward_pass(encoder(), data)  # the same weights, untouched statistics
    reestimate_batchnorm(model, data, batches=1, batch_size=len(data))
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == len(expected) == 3
    for norm, (mean, variance) in zip(norms, expected):
        torch.testing.assert_close(norm.running_mean, mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(norm.running_var, variance, rtol=1e-4, atol=1e-5)
        assert norm.momentum == 0.1  # restored for whoever trains it next
    assert not model.training


def test_batches_of_any_size_average_to_the_whole_sets_mean():
    data = images(100)
    model = encoder()
    reestimate_batchnorm(model, data, batches=4, batch_size=32)  # every image once: 32 + 32 + 32 + 4
    expected = batch_statistics_of_a_forward_pass(encoder(), data)
    first = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    torch.testing.assert_close(first.running_mean, expected[0][0], rtol=1e-4, atol=1e-5)


def test_the_baseline_features_differ_from_the_untouched_initialisation():
    data = images()
    untouched = extract_features(encoder(), data, batch_size=32)
    reestimated = extract_features(reestimate_batchnorm(encoder(), data, batches=2, batch_size=32), data, 32)
    assert untouched.shape == reestimated.shape
    assert not np.allclose(untouched, reestimated, atol=1e-3)


def test_zero_batches_keeps_the_initialisation():
    data = images()
    model = reestimate_batchnorm(encoder(), data, batches=0)
    norm = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert torch.equal(norm.running_mean, torch.zeros_like(norm.running_mean))
    assert torch.equal(norm.running_var, torch.ones_like(norm.running_var))


def test_a_network_without_batchnorm_is_left_as_it_is():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16 * 16 * 3, 4), nn.LayerNorm(4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert reestimate_batchnorm(model, images(), batches=2, batch_size=32) is model and not model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
