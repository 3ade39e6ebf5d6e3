"""Every method trains through the one loop (no Ray): its embeddings stay spread, a collapse is caught and
stopped with the fix, and MoCo's EMA teacher and queue survive an interruption exactly.

SimSiam without its stop-gradient, the paper's collapse, did not collapse here within 20 epochs on the
digits (std 0.4-0.57, rank 18-23, with BatchNorm in the backbone and heads), so a collapse MoCo shows is
the test that the monitor can fail."""

from __future__ import annotations

import pytest
import torch

from selfsup.config import DataConfig
from selfsup.data.arrays import load_split
from selfsup.data.sources import prepare_dataset
from selfsup.errors import CollapseError
from selfsup.methods import METHODS
from selfsup.params import load_params
from selfsup.train.loop import LocalSession, PretrainSpec, train_loop

# Heads small enough for seconds per epoch on 2 cores; each method's other knobs keep their defaults.
SMALL_KNOBS = {
    "simclr": {"projection_hidden_dim": 64, "projection_dim": 32},
    "moco": {"projection_hidden_dim": 64, "projection_dim": 32, "queue_size": 512},
    "byol": {"projection_hidden_dim": 64, "projection_dim": 32, "prediction_hidden_dim": 64},
    "simsiam": {"projection_hidden_dim": 64, "projection_dim": 64, "prediction_hidden_dim": 16},
    "swav": {"projection_hidden_dim": 64, "projection_dim": 32, "prototypes": 30, "local_crops": 2},
    "barlow_twins": {"projection_hidden_dim": 64, "projection_dim": 64},
    "dino": {"projection_hidden_dim": 64, "bottleneck_dim": 32, "output_dim": 256, "local_crops": 2},
    "obow": {"words": 256},
    "rotation": {"head_hidden_dim": 64},
    "jigsaw": {"tile_dim": 64, "head_hidden_dim": 64},
    "relative_location": {"head_hidden_dim": 64},
    "inpainting": {"decoder_hidden_dim": 64},
    "colorization": {"head_hidden_dim": 64},
    "counting": {"count_dim": 64, "head_hidden_dim": 64},
    "exemplar": {"embedding_dim": 32},
    "supervised": {},
}


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    folder = tmp_path_factory.mktemp("digits")
    manifest = prepare_dataset(DataConfig(source="digits", image_size=16), folder)
    return load_split(folder, "train", with_labels=False)[:512], manifest


@pytest.fixture(scope="module")
def digit_labels(digits, tmp_path_factory):
    """The labels of those images, for the supervised reference alone."""
    folder = tmp_path_factory.mktemp("digits-labelled")
    prepare_dataset(DataConfig(source="digits", image_size=16), folder)
    return load_split(folder, "train").labels[:512]


def make_spec(manifest, method: str, knobs: dict | None = None, **train) -> PretrainSpec:
    params = load_params(
        {
            "method": {"name": method, method: {**SMALL_KNOBS[method], **(knobs or {})}},
            "model": {"width": 0.5},
            "train": {
                "epochs": 3,
                "batch_size": 128,
                "checkpoint_every": 1,
                "warmup_epochs": 1,
                **train,
            },
        }
    )
    return PretrainSpec.from_params(params, manifest)  # 16 px digits, their 10 classes


def test_small_knobs_cover_every_method() -> None:
    assert SMALL_KNOBS.keys() == METHODS.keys()


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_trains_without_collapsing(digits, digit_labels, method: str, capsys) -> None:
    images, manifest = digits
    spec = make_spec(manifest, method)
    state = train_loop(images, spec, LocalSession(), labels=digit_labels if spec.uses_labels else None)
    history = state["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    for h in history:
        assert torch.isfinite(torch.tensor(h["loss"]))
        assert h["embedding_std"] > 0.1, h  # clearly above zero: the embeddings stay spread
        assert h["effective_rank"] > 2, h
    assert "std " in capsys.readouterr().out  # the progress line shows the collapse statistic


def test_a_collapsing_run_is_stopped_with_the_fix_and_keeps_a_healthy_checkpoint(digits, tmp_path) -> None:
    """MoCo at 5x its learning rate and twice its temperature collapses on the digits within a few epochs
    (its head has no BatchNorm): the check can fail, and says what to change."""
    images, manifest = digits
    spec = make_spec(manifest, "moco", {"temperature": 0.2}, lr=0.3, epochs=12, collapse_std=0.1, collapse_patience=2)
    with pytest.raises(CollapseError) as caught:
        train_loop(images, spec, LocalSession(tmp_path))
    message = str(caught.value)
    assert message.startswith("moco collapsed: the embeddings' std stayed below train.collapse_std=0.1 for 2 epochs")
    assert "method.moco.temperature" in message and "Lower train.lr (now 0.3)" in message
    kept = LocalSession(tmp_path).latest_checkpoint()
    assert f"the checkpoint of epoch {kept['epoch']} is kept" in message
    assert kept["history"][-1]["embedding_std"] >= 0.1  # written while the embeddings were healthy


def test_moco_resumed_run_ends_with_the_same_weights_teacher_and_queue(digits, tmp_path) -> None:
    images, manifest = digits
    spec = make_spec(manifest, "moco")
    straight = train_loop(images, spec, LocalSession(tmp_path / "straight"))

    class Interrupted(Exception):
        pass

    class InterruptingSession(LocalSession):
        def report(self, metrics, checkpoint):
            super().report(metrics, checkpoint)
            if metrics["epoch"] == 2:
                raise Interrupted

    with pytest.raises(Interrupted):
        train_loop(images, spec, InterruptingSession(tmp_path / "resumed"))
    resumed = train_loop(images, spec, LocalSession(tmp_path / "resumed"))
    assert {"queue", "queue_end"} <= set(resumed["method"]) and any(k.startswith("teacher.") for k in resumed["method"])
    for key, value in straight["method"].items():
        assert torch.equal(value, resumed["method"][key]), key
