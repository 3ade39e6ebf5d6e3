"""The per-worker training loop without Ray: resume is exact, a NaN loss stops cleanly, bad files are named."""

from __future__ import annotations

import pytest
import torch

from selfsup.config import DataConfig
from selfsup.data.arrays import load_split
from selfsup.data.sources import prepare_dataset
from selfsup.errors import CheckpointError, NonFiniteLossError
from selfsup.models import load_encoder, save_encoder
from selfsup.params import Params
from selfsup.train.loop import CHECKPOINT_FILE, LocalSession, PretrainSpec, build_model, train_loop


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    folder = tmp_path_factory.mktemp("digits")
    manifest = prepare_dataset(DataConfig(source="digits", image_size=16), folder)
    return load_split(folder, "train", with_labels=False)[:512], manifest


def make_spec(manifest, **train) -> PretrainSpec:
    params = Params.model_validate(
        {
            "train": {"epochs": 3, "batch_size": 128, "checkpoint_every": 1, "warmup_epochs": 1, **train},
            "method": {"simclr": {"projection_hidden_dim": 32, "projection_dim": 16}},
            "model": {"width": 0.5},
        }
    )
    return PretrainSpec(params.model, params.method, params.views, params.train, manifest.mean, manifest.std, 16)


class Interrupted(Exception):
    pass


class InterruptingSession(LocalSession):
    """Saves its checkpoint, then dies: a worker killed right after a checkpoint."""

    def __init__(self, stop_after_epoch: int, **kwargs):
        super().__init__(**kwargs)
        self.stop_after_epoch = stop_after_epoch

    def report(self, metrics, checkpoint):
        super().report(metrics, checkpoint)
        if metrics["epoch"] == self.stop_after_epoch:
            raise Interrupted


def test_resumed_run_ends_bit_identical_to_an_uninterrupted_one(digits, tmp_path, capsys):
    images, manifest = digits
    spec = make_spec(manifest)
    straight = train_loop(images, spec, LocalSession(tmp_path / "straight"))

    with pytest.raises(Interrupted):
        train_loop(images, spec, InterruptingSession(2, checkpoint_dir=tmp_path / "resumed"))
    resumed = train_loop(images, spec, LocalSession(tmp_path / "resumed"))

    assert "resuming from the checkpoint of epoch 2/3" in capsys.readouterr().out
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in straight["history"]]
    for key, value in straight["method"].items():
        assert torch.equal(value, resumed["method"][key]), key


def test_nan_loss_stops_with_the_fix_and_keeps_the_last_checkpoint(digits, tmp_path):
    images, manifest = digits
    folder = tmp_path / "run"
    train_loop(images, make_spec(manifest, epochs=1, warmup_epochs=0), LocalSession(folder))  # a healthy epoch
    with pytest.raises(NonFiniteLossError, match=r"epoch 2; the checkpoint of epoch 1 is kept.*Lower train.lr"):
        train_loop(images, make_spec(manifest, epochs=3, lr=1e12), LocalSession(folder))
    kept = LocalSession(folder).latest_checkpoint()
    assert kept["epoch"] == 1 and all(torch.isfinite(v).all() for v in kept["method"].values() if v.is_floating_point())


def test_corrupt_checkpoint_is_named_and_left_in_place(digits, tmp_path):
    images, manifest = digits
    path = tmp_path / CHECKPOINT_FILE
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=str(path)):
        train_loop(images, make_spec(manifest), LocalSession(tmp_path))
    assert path.read_bytes() == b"not a checkpoint"


def test_encoder_round_trip_and_truncated_file(digits, tmp_path):
    _, manifest = digits
    encoder = build_model(make_spec(manifest)).encoder.eval()
    path = tmp_path / "encoder.pt"
    save_encoder(encoder, path, manifest.image_size)
    loaded, size = load_encoder(path)
    x = torch.rand(4, 3, 16, 16)
    assert size == [16, 16] and torch.equal(loaded(x), encoder(x))

    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="re-run `dvc repro -f pretrain`"):
        load_encoder(path)
