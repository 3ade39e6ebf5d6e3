"""OBoW: its targets are distributions over the words, the vocabulary is a first-in-first-out queue of the
teacher's local features, the head is generated from the vocabulary, and the teacher gets no gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from selfsup.methods import build_method, method_views
from selfsup.methods.base import TrainingProgress
from selfsup.methods.obow import (
    DynamicBoWHead,
    bow_prediction_loss,
    bow_targets,
    inner_map,
    min_distance,
    sampled_local_features,
    soft_codes,
    squared_distances,
)
from selfsup.params import load_params
from tests.unit.methods.test_method_losses import TinyEncoder

PROGRESS = TrainingProgress(step=0, total_steps=10, steps_per_epoch=1)


def obow(**knobs):
    torch.manual_seed(0)
    params = load_params({"method": {"name": "obow", "obow": {"words": 6, "local_crops": 0, **knobs}}})
    return build_method(TinyEncoder(), params.method)


def test_bow_targets_are_distributions_over_the_words_and_hard_codes_pick_the_nearest_word():
    features, words = torch.rand(3, 4, 5, 5), torch.rand(7, 4)
    codes = soft_codes(squared_distances(features, words), torch.tensor(10.0))
    assert codes.shape == (3, 7, 5, 5) and (codes >= 0).all()
    assert torch.allclose(codes.sum(1), torch.ones(3, 5, 5))
    targets = bow_targets(codes)
    assert targets.shape == (3, 7) and (targets >= 0).all() and torch.allclose(targets.sum(1), torch.ones(3))
    # At a very low temperature each location's code is one-hot on its nearest word, found here by brute force.
    sharp = soft_codes(squared_distances(features, words), torch.tensor(1e6))
    local = features.flatten(2).transpose(1, 2)  # 3 x 25 x 4
    nearest = ((local.unsqueeze(2) - words) ** 2).sum(3).argmin(2)  # 3 x 25
    assert torch.equal(sharp.flatten(2).argmax(1), nearest)
    assert torch.allclose(sharp.flatten(2).amax(1), torch.ones(3, 25), atol=1e-4)
    # max-pooled then L1-normalised: the words an image holds, equally
    held = bow_targets(sharp)
    for image in range(3):
        present = nearest[image].unique()
        assert torch.allclose(held[image, present], torch.full((len(present),), 1 / len(present)), atol=1e-3)
    expected = ((local.unsqueeze(2) - words) ** 2).sum(3).amin(2).mean()
    assert torch.allclose(min_distance(squared_distances(features, words)), expected, atol=1e-5)


def test_the_border_is_dropped_from_maps_big_enough_and_samples_are_local_averages_of_their_own_image():
    assert inner_map(torch.rand(2, 3, 4, 4)).shape == (2, 3, 2, 2)
    assert inner_map(torch.rand(2, 3, 2, 2)).shape == (2, 3, 2, 2)  # too small to lose a border
    features = torch.rand(4, 3, 5, 5)
    sampled = sampled_local_features(features)
    pooled = F.avg_pool2d(features, 3, stride=1).flatten(2)  # 4 x 3 x 9 candidate locations
    for image in range(4):
        assert (pooled[image].T - sampled[image]).abs().sum(1).min() < 1e-6  # one of its own locations
    assert sampled_local_features(torch.rand(4, 3, 2, 2)).shape == (4, 3)  # a 2x2 kernel on a 2x2 map


def test_the_vocabulary_is_a_first_in_first_out_queue_of_the_teachers_local_features():
    method = obow(words=6)
    initial = method.vocabulary.clone()
    seen = []
    for step in range(4):  # 2 features per step into 6 words: the fourth step wraps around
        method([torch.rand(2, 3, 16, 16) for _ in range(3)])
        seen.append(method._sampled.clone())
        method.after_step(TrainingProgress(step, 10, 1))
    newest = torch.cat(seen)  # 8 features, in order
    assert int(method.vocabulary_end) == 8 % 6
    assert torch.equal(method.vocabulary[2:], newest[2:6])  # steps 2 and 3 ...
    assert torch.equal(method.vocabulary[:2], newest[6:])  # ... and step 4 overwrote the oldest, step 1's
    assert not torch.equal(method.vocabulary, initial)


def test_the_teacher_gets_no_gradient_and_the_student_does():
    method = obow()
    loss, embeddings = method([torch.rand(4, 3, 16, 16) for _ in range(3)])
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in method.teacher.parameters())
    assert method.encoder.net[0].weight.grad.abs().sum() > 0
    assert embeddings.shape == (4, 8) and not embeddings.requires_grad
    teacher_before = [p.clone() for p in method.teacher.parameters()]
    torch.optim.SGD(method.parameters(), lr=0.1).step()
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, method.teacher.parameters()))  # the optimiser's
    method.after_step(PROGRESS)
    assert any(not torch.equal(a, b) for a, b in zip(teacher_before, method.teacher.parameters()))  # the EMA's


def test_the_head_is_generated_from_the_vocabulary_and_has_no_weights_per_word():
    head = DynamicBoWHead(word_dim=4, feature_dim=8, kappa=5.0)
    assert sum(p.numel() for p in head.parameters()) == 4 * 16 + 16 * 2 + 16 * 8 + 8
    features, words = torch.rand(3, 8), torch.rand(10, 4)
    logits = head(features, words)
    assert logits.shape == (3, 10)
    assert logits.abs().max() <= 5.0 * features.norm(dim=1).max() + 1e-5  # kappa times unit weight vectors
    assert head(features, torch.rand(20, 4)).shape == (3, 20)  # any vocabulary size
    assert not torch.allclose(head(features, words + torch.rand(10, 4)), logits)


def test_the_teacher_sees_the_whole_image_without_colour_change_and_the_student_crops():
    params = load_params(
        {"method": {"name": "obow", "obow": {"local_crops": 2}}, "views": {"jitter_prob": 0.8, "flip_prob": 0.5}}
    )
    teacher, *student = method_views(params.method, params.views, 16)
    assert teacher.config.crop_scale == (1.0, 1.0) and teacher.config.jitter_prob == 0
    assert teacher.config.flip_prob == 0.5
    assert [s.config.jitter_prob for s in student] == [0.8] * 4 and [s.size for s in student] == [None, None, 8, 8]


def test_obow_lowers_its_loss_on_a_batch():
    method = obow(words=32)
    optimizer = torch.optim.SGD(method.parameters(), lr=0.1, momentum=0.9)
    images = torch.rand(16, 3, 16, 16)
    for step in range(10):  # fill the vocabulary with real features first
        method([images] * 3)
        method.after_step(TrainingProgress(step, 100, 1))
    losses = []
    for step in range(30):
        loss, _ = method([images, (images + 0.05 * torch.randn_like(images)).clamp(0, 1), images.flip(3)])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def reference_obow_loss(logits_by_type: list[list[torch.Tensor]], targets: torch.Tensor) -> torch.Tensor:
    """valeoai/obow: per crop type, the crops stacked into one batch and one mean cross-entropy to the bag;
    the types' losses summed (`losses.sum()` in its train_step). Less the targets' entropy, which is constant."""
    total = 0
    for crops in logits_by_type:
        stacked = torch.cat([F.log_softmax(c, dim=1) for c in crops])
        cross_entropy = -(targets.repeat(len(crops), 1) * stacked).sum(1).mean()
        entropy = -(targets * targets.clamp(min=1e-30).log()).sum(1).mean()
        total = total + cross_entropy - entropy
    return total


@pytest.mark.parametrize("local", [0, 2, 5])
def test_the_loss_is_one_mean_per_crop_type_summed_as_the_reference(local):
    generator = torch.Generator().manual_seed(local)
    targets = F.normalize(torch.rand(4, 6, generator=generator), p=1, dim=1)
    logits = [torch.randn(4, 6, generator=generator, dtype=torch.float64).requires_grad_() for _ in range(2 + local)]
    ours = bow_prediction_loss(
        [F.log_softmax(x, dim=1) for x in logits[:2]], [F.log_softmax(x, dim=1) for x in logits[2:]], targets.double()
    )
    types = [logits[:2]] + ([logits[2:]] if local else [])
    theirs = reference_obow_loss(types, targets.double())
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(torch.autograd.grad(ours, logits), torch.autograd.grad(theirs, logits))


def test_local_crops_weigh_as_one_type_whatever_their_number():
    targets = F.normalize(torch.rand(4, 6), p=1, dim=1)
    same = F.log_softmax(torch.randn(4, 6), dim=1)
    two, five = (
        bow_prediction_loss([same, same], [same] * 2, targets),
        bow_prediction_loss([same, same], [same] * 5, targets),
    )
    torch.testing.assert_close(two, five)
    torch.testing.assert_close(
        two, 2 * bow_prediction_loss([same, same], [], targets)
    )  # the 2+2 gradient is twice 2+0's
