"""Exemplar-CNN: each image its own class, its label the index the loop passes; the memory bank's update."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from selfsup.config import DataConfig
from selfsup.data.arrays import load_split
from selfsup.data.sources import prepare_dataset
from selfsup.methods import build_method, uses_indices
from selfsup.methods.base import TrainingProgress
from selfsup.methods.exemplar import instance_logits
from selfsup.params import load_params
from selfsup.train.loop import LocalSession, PretrainSpec, build_model, train_loop
from tests.unit.methods.test_method_losses import TinyEncoder

PROGRESS = TrainingProgress(step=0, total_steps=1, steps_per_epoch=1)


def exemplar(num_images: int = 6, **knobs):
    torch.manual_seed(0)
    params = load_params({"method": {"name": "exemplar", "exemplar": {"embedding_dim": 4, **knobs}}})
    return build_method(TinyEncoder(), params.method, num_images=num_images)


def test_only_exemplar_reads_the_indices():
    assert uses_indices(load_params({"method": {"name": "exemplar"}}).method)
    assert not any(
        uses_indices(load_params({"method": {"name": n}}).method) for n in ("simclr", "rotation", "supervised")
    )
    with pytest.raises(ValueError, match="at least 2 images"):
        exemplar(num_images=0)


def test_the_loss_is_the_cross_entropy_of_each_view_against_its_own_image_in_the_bank():
    method = exemplar()
    views, indices = [torch.rand(3, 3, 8, 8)], torch.tensor([4, 0, 2])
    loss, embeddings = method(views, indices=indices)
    logits = F.normalize(embeddings, dim=1) @ method.bank.T / method.knobs.temperature
    assert torch.allclose(loss, F.cross_entropy(logits, indices), atol=1e-6)
    assert torch.allclose(instance_logits(embeddings, method.bank, 0.07), logits * method.knobs.temperature / 0.07)
    # Another index for the same view is another class: the loss moves.
    assert not torch.allclose(method(views, indices=torch.tensor([1, 0, 2]))[0], loss)


def test_the_bank_moves_only_the_rows_of_the_step_and_keeps_them_unit_length():
    method = exemplar(bank_momentum=0.5)
    before = method.bank.clone()
    views, indices = [torch.rand(2, 3, 8, 8)], torch.tensor([3, 1])
    _, embeddings = method(views, indices=indices)
    method.after_step(PROGRESS)
    expected = F.normalize(0.5 * before[indices] + 0.5 * F.normalize(embeddings, dim=1), dim=1)
    assert torch.allclose(method.bank[indices], expected, atol=1e-6)
    untouched = torch.tensor([0, 2, 4, 5])
    assert torch.equal(method.bank[untouched], before[untouched])
    assert torch.allclose(method.bank.norm(dim=1), torch.ones(6))


def test_the_parametric_classifier_learns_its_class_vectors_and_keeps_no_bank():
    method = exemplar(classifier="parametric")
    assert not hasattr(method, "bank") and method.classes.shape == (6, 4)
    loss, _ = method([torch.rand(2, 3, 8, 8)], indices=torch.tensor([0, 5]))
    loss.backward()
    assert method.classes.grad[[0, 5]].abs().sum() > 0


def test_exemplar_learns_to_tell_its_images_apart_under_augmentation():
    method = exemplar(num_images=8, temperature=0.1)
    optimizer = torch.optim.SGD(method.parameters(), lr=0.5, momentum=0.9)
    images, indices = torch.rand(8, 3, 8, 8), torch.arange(8)
    losses = []
    for step in range(40):
        noisy = (images + 0.05 * torch.randn_like(images)).clamp(0, 1)  # a fresh view each step
        loss, _ = method([noisy], indices=indices)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        method.after_step(TrainingProgress(step, 40, 1))
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    folder = tmp_path_factory.mktemp("digits")
    manifest = prepare_dataset(DataConfig(source="digits", image_size=16), folder)
    return load_split(folder, "train", with_labels=False)[:256], manifest


def test_the_loop_gives_every_image_its_own_row_of_the_bank(digits):
    images, manifest = digits
    params = load_params(
        {
            "method": {"name": "exemplar"},
            "model": {"width": 0.25},
            "train": {"epochs": 1, "warmup_epochs": 0, "batch_size": 64, "checkpoint_every": 1},
        }
    )
    spec = PretrainSpec.from_params(params, manifest)
    initial = build_model(spec, num_images=len(images)).bank
    state = train_loop(images, spec, LocalSession())
    bank = state["method"]["bank"]
    assert bank.shape == (256, 128)
    # One epoch visits each of the 256 images once (4 steps of 64): every row was written.
    assert not torch.isclose(bank, initial, atol=1e-4).all(1).any()
