"""The evaluation protocols' parts: label subsets, the validation split, semi-supervised fine-tuning, the
pretraining monitor, the linear probe's top-k, the embedded MNIST target and the champion's metric."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from selfsup.config import DataConfig, LinearConfig, ModelConfig, SemisupConfig
from selfsup.data.arrays import load_split
from selfsup.data.sources import prepare_dataset
from selfsup.errors import ConfigError
from selfsup.eval.features import extract_features
from selfsup.eval.linear import topk_accuracy
from selfsup.eval.semisup import fine_tune, label_subset
from selfsup.models import Encoder
from selfsup.params import Params, load_params
from selfsup.train.loop import LocalSession, PretrainSpec, train_loop
from selfsup.train.monitor import LabelledProbe, Monitor


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    folder = tmp_path_factory.mktemp("digits")
    prepare_dataset(DataConfig(), folder)
    return {split: load_split(folder, split) for split in ("train", "val", "test")}


def test_label_subsets_are_class_balanced_nested_and_fixed_by_their_seed():
    labels = np.repeat(np.arange(10), [130, 120, 125, 129, 131, 128, 126, 127, 124, 135])
    one, ten = label_subset(labels, 0.01, seed=0), label_subset(labels, 0.1, seed=0)
    assert np.bincount(labels[one]).tolist() == [1] * 10  # 1% of ~128 rounds to 1: at least one per class
    assert np.bincount(labels[ten]).tolist() == [13, 12, 12, 13, 13, 13, 13, 13, 12, 14]  # 10% of each class
    assert set(one) <= set(ten)  # the 1% images are among the 10%
    assert np.array_equal(label_subset(labels, 0.1, seed=0), ten)  # the same file whatever the method or run
    assert not np.array_equal(label_subset(labels, 0.1, seed=1), ten)
    assert len(np.unique(ten)) == len(ten) and ten.max() < len(labels)


def test_prepare_carves_a_stratified_validation_split_out_of_train(digits):
    train, val, test = digits["train"], digits["val"], digits["test"]
    assert len(train.labels) + len(val.labels) + len(test.labels) == 1797
    assert len(val.labels) == pytest.approx(0.1 * (len(train.labels) + len(val.labels)), abs=10)
    assert np.bincount(val.labels).min() >= 10  # every class, in proportion
    # No image of val is a training image (digits has a few exact duplicates; far fewer than val holds).
    train_rows = {image.tobytes() for image in train.images}
    assert sum(image.tobytes() in train_rows for image in val.images) < 5


def test_the_embedded_mnist_target_loads_without_network(tmp_path):
    manifest = prepare_dataset(DataConfig(source="mnist"), tmp_path)
    assert sum(info["count"] for info in manifest.splits.values()) == 5000
    assert manifest.image_size == [16, 16] and manifest.class_names == [str(c) for c in range(10)]
    test = load_split(tmp_path, "test")
    assert np.bincount(test.labels).tolist() == [100] * 10  # 20% of the 500 per class
    assert test.images.std() > 50  # real strokes, not an empty array


def test_top5_counts_a_label_among_the_five_best_scores():
    logits = torch.tensor([[9.0, 8, 7, 6, 5, 4], [0, 1, 2, 3, 4, 5]])
    assert topk_accuracy(logits, np.array([4, 0]), k=5) == 0.5
    assert topk_accuracy(logits, np.array([0, 5]), k=1) == 1.0


def test_fine_tuning_learns_from_a_few_labels_and_is_repeatable(digits):
    train, test = digits["train"], digits["test"]
    config = SemisupConfig(steps=60, batch_size=32, lr=0.05)
    subset = label_subset(train.labels, 0.1, seed=0)
    torch.manual_seed(0)
    encoder = Encoder(ModelConfig(width=0.5), [0.5] * 3, [0.25] * 3, image_size=16)
    before = [p.detach().clone() for p in encoder.parameters()]
    model = fine_tune(encoder, train.images[subset], train.labels[subset], 10, config, seed=0)
    accuracy = topk_accuracy(torch.from_numpy(extract_features(model, test.images)), test.labels)
    assert accuracy > 0.5  # 10 classes: chance is 0.1
    again = fine_tune(encoder, train.images[subset], train.labels[subset], 10, config, seed=0)
    assert np.array_equal(extract_features(again, test.images), extract_features(model, test.images))
    assert all(torch.equal(p, b) for p, b in zip(encoder.parameters(), before))  # copied, not trained in place


def test_the_monitor_watches_without_changing_training(digits):
    train, val = digits["train"], digits["val"]
    params = Params.model_validate(
        {
            "model": {"width": 0.25},
            "method": {"simclr": {"projection_hidden_dim": 32, "projection_dim": 16}},
            "train": {"epochs": 3, "batch_size": 256, "warmup_epochs": 0, "monitor_every": 2, "checkpoint_every": 1},
        }
    )
    spec = PretrainSpec(params.model, params.method, params.views, params.train, [0.5] * 3, [0.25] * 3, 16)
    images = train.images[:512]
    # With a linear probe too (a sweep's monitor_linear_top1): its weights' random init must not shift training.
    linear = LinearConfig(epochs=5)
    monitor = Monitor(val.images, LabelledProbe(train.labels[:512], val.images, val.labels, k=20, linear=linear))
    watched = train_loop(images, spec, LocalSession(), monitor)
    unwatched = train_loop(images, spec, LocalSession())
    assert [("monitor_knn_top1" in row) for row in watched["history"]] == [False, True, True]  # epoch 2, and the last
    assert all(0.1 < row["monitor_knn_top1"] <= 1 for row in watched["history"][1:])
    assert all(0.1 < row["monitor_linear_top1"] <= 1 for row in watched["history"][1:])
    assert all(1 < row["monitor_rankme"] <= 32 for row in watched["history"][1:])  # of 32-d features (width 0.25)
    assert not any("monitor_knn_top1" in row for row in unwatched["history"])
    for key, value in unwatched["method"].items():  # the monitor's eval-mode passes leave no trace
        assert torch.equal(watched["method"][key], value), key


def test_the_champion_metric_must_be_one_that_is_measured():
    with pytest.raises(ConfigError, match="mlflow.champion_metric='knn_k50_top1' is not measured; allowed: knn_k10"):
        load_params({"mlflow": {"champion_metric": "knn_k50_top1"}})
    assert load_params({"eval": {"knn": {"k": [50]}}, "mlflow": {"champion_metric": "knn_k50_top1"}})
    with pytest.raises(ConfigError, match="eval.transfer.root is required for eval.transfer.source='cifar100'"):
        load_params({"eval": {"transfer": {"source": "cifar100"}}})
