"""Labels reach pretraining only for the supervised reference and a labelled auxiliary term, and a weight of 0
leaves every method exactly as it is."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from selfsup.config import DataConfig
from selfsup.data.arrays import load_split
from selfsup.data.sources import prepare_dataset
from selfsup.errors import ConfigError
from selfsup.methods import METHODS, build_method, uses_labels
from selfsup.methods.supervised import LabelledLoss
from selfsup.params import load_params
from selfsup.train.loop import LocalSession, PretrainSpec, train_loop
from tests.unit.methods.test_method_losses import SMALL_KNOBS, TinyEncoder, declared_views


def params_for(name: str, **train):
    return load_params({"method": {"name": name, name: SMALL_KNOBS[name]}, "train": train})


@pytest.mark.parametrize("name", list(METHODS))
def test_only_the_supervised_reference_or_a_labelled_term_reads_labels(name):
    params = params_for(name)
    assert uses_labels(params.method, params.train) == (name == "supervised")
    if name != "supervised":
        weighted = params_for(name, label_loss_weight=0.5)
        assert uses_labels(weighted.method, weighted.train)


def test_a_labelled_term_beside_the_supervised_reference_is_refused():
    with pytest.raises(ConfigError, match="method.name=supervised already trains on the labels: set it to 0"):
        params_for("supervised", label_loss_weight=0.5)


@pytest.mark.parametrize("name", ["simclr", "byol", "rotation"])
def test_weight_zero_is_the_plain_method_and_a_weight_adds_exactly_its_cross_entropy(name):
    params = params_for(name)
    torch.manual_seed(0)
    plain = build_method(TinyEncoder(), params.method, num_classes=10)
    assert build_method(TinyEncoder(), params.method, 10, label_loss_weight=0.0).__class__ is plain.__class__
    views, labels = declared_views(name, n=4), torch.tensor([0, 1, 2, 3])
    torch.manual_seed(1)
    expected_loss, expected_embeddings = plain(views)

    for weight in (0.0, 0.7):
        wrapped = LabelledLoss(plain, num_classes=10, weight=weight)
        torch.manual_seed(1)  # the same draws inside the method (e.g. none, or a queue's) as the plain call
        loss, embeddings = wrapped(views, labels)
        labelled = F.cross_entropy(wrapped.head(plain.encoder(views[0])), labels)
        torch.testing.assert_close(loss, expected_loss + weight * labelled)
        torch.testing.assert_close(embeddings, expected_embeddings)
        assert wrapped.encoder is plain.encoder


@pytest.fixture(scope="module")
def labelled_digits(tmp_path_factory):
    folder = tmp_path_factory.mktemp("digits")
    manifest = prepare_dataset(DataConfig(), folder)
    train = load_split(folder, "train")
    return train.images[:256], train.labels[:256], manifest


def spec_for(manifest, name: str, **train) -> PretrainSpec:
    raw = {
        "method": {"name": name, name: SMALL_KNOBS[name]},
        "model": {"width": 0.25},
        "train": {"epochs": 2, "batch_size": 128, "warmup_epochs": 0, "checkpoint_every": 1, **train},
    }
    return PretrainSpec.from_params(load_params(raw), manifest)


def test_labels_handed_to_a_self_supervised_method_never_reach_it(labelled_digits):
    images, labels, manifest = labelled_digits
    spec = spec_for(manifest, "simclr")
    without = train_loop(images, spec, LocalSession())
    handed = train_loop(images, spec, LocalSession(), labels=np.roll(labels, 1))
    for key, value in without["method"].items():
        assert torch.equal(handed["method"][key], value), key


def test_a_labelled_run_without_labels_stops_with_the_reason(labelled_digits):
    images, _, manifest = labelled_digits
    for name, train in (("supervised", {}), ("simclr", {"label_loss_weight": 0.5})):
        with pytest.raises(ConfigError, match="trains on labels, but none were given"):
            train_loop(images, spec_for(manifest, name, **train), LocalSession())


def test_the_supervised_reference_and_the_labelled_term_learn_from_the_labels(labelled_digits):
    images, labels, manifest = labelled_digits
    spec = spec_for(manifest, "supervised", epochs=5, batch_size=32, lr=0.5)
    supervised = train_loop(images, spec, LocalSession(), labels=labels)
    losses = [h["loss"] for h in supervised["history"]]
    assert losses[-1] < 0.6 * losses[0], losses  # cross-entropy from log(10) = 2.3 down
    weighted = train_loop(images, spec_for(manifest, "simclr", label_loss_weight=1.0), LocalSession(), labels=labels)
    assert any(key.startswith("head.") for key in weighted["method"])  # the labelled head trained beside it


def test_the_labelled_term_passes_the_wrapped_methods_hooks_through():
    from selfsup.methods.base import TrainingProgress

    progress = TrainingProgress(step=0, total_steps=4, steps_per_epoch=2)
    # BYOL: after_step moves the EMA teacher, through the wrapper.
    torch.manual_seed(0)
    byol = build_method(TinyEncoder(), params_for("byol").method, num_classes=10, label_loss_weight=0.5)
    assert isinstance(byol, LabelledLoss)
    with torch.no_grad():
        byol.method.encoder.net[0].weight.add_(1.0)
    before = byol.method.teacher.encoder.net[0].weight.clone()
    byol.after_step(progress)
    assert not torch.equal(before, byol.method.teacher.encoder.net[0].weight)
    # SimSiam: the predictor kept at a fixed learning rate, through the wrapper.
    simsiam = build_method(TinyEncoder(), params_for("simsiam").method, num_classes=10, label_loss_weight=0.5)
    assert {id(p) for p in simsiam.fixed_lr_parameters()} == {id(p) for p in simsiam.method.predictor.parameters()}
    # SwAV: after_backward freezes the prototypes early on, through the wrapper.
    swav = build_method(TinyEncoder(), params_for("swav").method, num_classes=10, label_loss_weight=0.5)
    loss, _ = swav(declared_views("swav"), labels=torch.arange(4) % 10)
    loss.backward()
    assert swav.method.prototypes.weight.grad is not None
    swav.after_backward(progress)
    assert swav.method.prototypes.weight.grad is None
