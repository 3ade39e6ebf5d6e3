"""The SimCLR loss against a naive NT-Xent, and the kNN / linear-probe evaluations on derivable cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from selfsup.config import KnnConfig, LinearConfig
from selfsup.eval.knn import knn_accuracy, knn_predict
from selfsup.eval.linear import linear_probe_accuracy
from selfsup.methods.simclr import nt_xent_loss


def naive_nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> float:
    """NT-Xent written out term by term in float64 (Chen et al., 2020, eq. 1), one anchor at a time."""
    rows = [[float(v) for v in row] for row in torch.cat([z1, z2]).detach().double()]
    n2 = len(rows)
    n = n2 // 2

    def cosine(a: list[float], b: list[float]) -> float:
        dot = sum(x * y for x, y in zip(a, b))
        return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))

    total = 0.0
    for i in range(n2):
        positive = (i + n) % n2
        numerator = math.exp(cosine(rows[i], rows[positive]) / temperature)
        denominator = sum(math.exp(cosine(rows[i], rows[k]) / temperature) for k in range(n2) if k != i)
        total += -math.log(numerator / denominator)
    return total / n2


@pytest.mark.parametrize("n, d", [(2, 3), (4, 8), (7, 5), (16, 32)])
@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0, 2.0])
def test_nt_xent_matches_naive_formula(n: int, d: int, temperature: float) -> None:
    generator = torch.Generator().manual_seed(1000 * n + d)
    z1 = torch.randn(n, d, generator=generator) * 3.0  # unnormalised on purpose: the loss normalises
    z2 = torch.randn(n, d, generator=generator) + 0.5
    loss = nt_xent_loss(z1, z2, temperature)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(naive_nt_xent(z1, z2, temperature), rel=1e-4, abs=1e-5)


def test_nt_xent_float64_is_exact() -> None:
    generator = torch.Generator().manual_seed(3)
    z1, z2 = (
        torch.randn(5, 6, generator=generator, dtype=torch.float64),
        torch.randn(5, 6, generator=generator, dtype=torch.float64),
    )
    assert nt_xent_loss(z1, z2, 0.3).item() == pytest.approx(naive_nt_xent(z1, z2, 0.3), rel=1e-10)


def test_nt_xent_is_symmetric_in_the_views() -> None:
    generator = torch.Generator().manual_seed(4)
    z1, z2 = torch.randn(6, 4, generator=generator), torch.randn(6, 4, generator=generator)
    assert nt_xent_loss(z1, z2, 0.2).item() == pytest.approx(nt_xent_loss(z2, z1, 0.2).item(), rel=1e-5)


def test_nt_xent_is_scale_invariant() -> None:
    generator = torch.Generator().manual_seed(5)
    z1, z2 = torch.randn(6, 4, generator=generator), torch.randn(6, 4, generator=generator)
    assert nt_xent_loss(10 * z1, 0.1 * z2, 0.5).item() == pytest.approx(nt_xent_loss(z1, z2, 0.5).item(), rel=1e-5)


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_identical_views_give_lower_loss_than_unrelated_views(temperature: float) -> None:
    generator = torch.Generator().manual_seed(6)
    z = torch.randn(32, 16, generator=generator)
    unrelated = torch.randn(32, 16, generator=generator)
    aligned = nt_xent_loss(z, z.clone(), temperature).item()
    random = nt_xent_loss(z, unrelated, temperature).item()
    assert aligned < random


def test_perfectly_separated_views_approach_zero_loss() -> None:
    # One-hot embeddings: the positive has cosine 1, every negative cosine 0; low T makes the loss ~0.
    z = torch.eye(8)
    assert nt_xent_loss(z, z.clone(), 0.05).item() < 1e-6
    expected = -math.log(math.exp(1 / 0.5) / (math.exp(1 / 0.5) + 14))  # 2N - 2 = 14 negatives, each exp(0)
    assert nt_xent_loss(z, z.clone(), 0.5).item() == pytest.approx(expected, rel=1e-5)


def test_nt_xent_gradients_flow_and_are_finite() -> None:
    generator = torch.Generator().manual_seed(7)
    z1 = torch.randn(8, 12, generator=generator).requires_grad_()
    z2 = torch.randn(8, 12, generator=generator).requires_grad_()
    loss = nt_xent_loss(z1, z2, 0.2)
    loss.backward()
    for grad in (z1.grad, z2.grad):
        assert grad is not None
        assert torch.isfinite(grad).all()
        assert grad.abs().sum() > 0
        assert (grad.abs().sum(1) > 0).all()  # every embedding receives a gradient
    # A gradient step on the embeddings lowers the loss: the gradient points the right way.
    with torch.no_grad():
        stepped = nt_xent_loss(z1 - 0.1 * z1.grad, z2 - 0.1 * z2.grad, 0.2)
    assert stepped.item() < loss.item()


def test_nt_xent_gradient_matches_finite_differences() -> None:
    generator = torch.Generator().manual_seed(8)
    z1 = torch.randn(3, 4, generator=generator, dtype=torch.float64).requires_grad_()
    z2 = torch.randn(3, 4, generator=generator, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: nt_xent_loss(a, b, 0.4), (z1, z2))


# --- weighted kNN ------------------------------------------------------------------------------


def _unit(degrees: float) -> list[float]:
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


def test_knn_tiny_case_by_hand() -> None:
    # Two clusters on the unit circle; a test point belongs to the cluster it points at.
    train = np.array([_unit(0), _unit(10), _unit(-10), _unit(90), _unit(100), _unit(80)], dtype=np.float32)
    train_labels = np.array([0, 0, 0, 1, 1, 1])
    test = np.array([_unit(5), _unit(85), _unit(-20), _unit(120)], dtype=np.float32)
    config = KnnConfig(k=3, temperature=0.07)
    assert knn_predict(train, train_labels, test, config)[3].tolist() == [0, 1, 0, 1]
    assert knn_accuracy(train, train_labels, test, np.array([0, 1, 0, 1]), config) == {3: 1.0}
    assert knn_accuracy(train, train_labels, test, np.array([0, 1, 1, 1]), config) == {3: 0.75}
    assert knn_accuracy(train, train_labels, test, np.array([1, 0, 1, 0]), config) == {3: 0.0}


def test_knn_uses_cosine_similarity_not_distance() -> None:
    # Scaled far away but pointing the same way: cosine says class 0, Euclidean distance would say 1.
    train = np.array([[100.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    test = np.array([[1.0, 0.1]], dtype=np.float32)
    assert knn_predict(train, np.array([0, 1]), test, KnnConfig(k=1, temperature=0.1))[1].tolist() == [0]


def test_knn_votes_are_weighted_by_temperature() -> None:
    # The test point (angle 0) has one class-1 neighbour at cosine 1.0 and two class-0 neighbours at
    # cosine cos(30 deg) = 0.866. With T = 0.07 the weights are exp(14.29) vs 2 exp(12.37): class 1
    # wins by a factor ~3.4. With T = 10 the weights are nearly equal and the 2-vs-1 majority wins.
    train = np.array([_unit(0), _unit(30), _unit(-30)], dtype=np.float32)
    labels = np.array([1, 0, 0])
    test = np.array([_unit(0)], dtype=np.float32)
    assert knn_predict(train, labels, test, KnnConfig(k=3, temperature=0.07))[3].tolist() == [1]
    assert knn_predict(train, labels, test, KnnConfig(k=3, temperature=10.0))[3].tolist() == [0]
    # k = 1: only the nearest neighbour votes.
    assert knn_predict(train, labels, test, KnnConfig(k=1, temperature=10.0))[1].tolist() == [1]


def test_knn_k_larger_than_train_set_and_chunking() -> None:
    generator = np.random.default_rng(0)
    centers = np.array([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0]])
    train_labels = np.repeat(np.arange(3), 4)
    train = (centers[train_labels] + generator.normal(size=(12, 3))).astype(np.float32)
    test_labels = np.tile(np.arange(3), 10)
    test = (centers[test_labels] + generator.normal(size=(30, 3))).astype(np.float32)
    config = KnnConfig(k=50, temperature=0.07)  # k > 12 train points: clipped to 12
    whole = knn_predict(train, train_labels, test, config)
    chunked = knn_predict(train, train_labels, test, config, chunk=7)
    assert whole[50].tolist() == chunked[50].tolist()
    assert knn_accuracy(train, train_labels, test, test_labels, config)[50] >= 0.9


def test_several_k_in_one_pass_equal_each_k_alone():
    generator = np.random.default_rng(1)
    train, test = generator.normal(size=(200, 8)).astype(np.float32), generator.normal(size=(50, 8)).astype(np.float32)
    labels = generator.integers(0, 5, 200)
    together = knn_predict(train, labels, test, KnnConfig(k=[1, 7, 40], temperature=0.1))
    for k in (1, 7, 40):
        assert together[k].tolist() == knn_predict(train, labels, test, KnnConfig(k=k, temperature=0.1))[k].tolist()
    assert together[1].tolist() != together[40].tolist()  # the k matter


# --- linear probe --------------------------------------------------------------------------------


def test_linear_probe_separates_linearly_separable_data() -> None:
    rng = np.random.default_rng(0)
    num_classes, dim = 4, 16
    weights = rng.normal(size=(dim, num_classes))
    features = rng.normal(size=(800, dim))
    scores = features @ weights
    top2 = np.sort(scores, axis=1)[:, -2:]
    keep = (top2[:, 1] - top2[:, 0]) > 0.5  # a margin: the classes are linearly separable
    features, labels = features[keep].astype(np.float32) * 7.0 + 3.0, scores[keep].argmax(1)  # any scale
    split = len(features) * 3 // 4
    config = LinearConfig(epochs=30, lr=0.05, batch_size=128)
    accuracy = linear_probe_accuracy(features[:split], labels[:split], features[split:], labels[split:], config)
    assert accuracy >= 0.95
    # Same seed, same answer.
    again = linear_probe_accuracy(features[:split], labels[:split], features[split:], labels[split:], config)
    assert again == accuracy


def test_linear_probe_is_near_chance_on_random_labels() -> None:
    rng = np.random.default_rng(1)
    features = rng.normal(size=(600, 8)).astype(np.float32)
    labels = rng.integers(0, 4, size=600)
    config = LinearConfig(epochs=20, lr=0.05, batch_size=64)
    accuracy = linear_probe_accuracy(features[:400], labels[:400], features[400:], labels[400:], config)
    assert accuracy < 0.45  # chance is 0.25; a probe that scored high here would be leaking labels
