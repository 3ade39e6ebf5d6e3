"""Registration into a real MLflow registry (local SQLite store): aliases, lineage, loading back."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from selfsup.config import MlflowConfig, ModelConfig
from selfsup.models import Encoder, save_encoder


@pytest.fixture
def encoder_file(tmp_path):
    import torch

    torch.manual_seed(0)
    encoder = Encoder(ModelConfig(backbone="small_cnn", width=0.25), mean=[0.5] * 3, std=[0.25] * 3)
    path = tmp_path / "encoder.pt"
    save_encoder(encoder, path, [16, 16])
    return path, encoder.feature_dim


def test_champion_moves_only_when_beaten(tmp_path, encoder_file, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    import mlflow

    from selfsup.errors import TrackingError
    from selfsup.tracking import promote, register_encoder

    path, dim = encoder_file
    config = MlflowConfig(model_name="test-encoder")
    example = np.random.default_rng(0).integers(0, 255, (2, 16, 16, 3), dtype=np.uint8)
    aliases = []
    for i, knn in enumerate((0.50, 0.40, 0.60)):
        torch.manual_seed(i + 1)  # another encoder each time: each lands in its own run, found by its sha256
        path = tmp_path / f"encoder{i}.pt"
        save_encoder(Encoder(ModelConfig(width=0.25), mean=[0.5] * 3, std=[0.25] * 3), path, [16, 16])
        registration = register_encoder(
            path,
            config,
            tmp_path,
            params={"train": {"lr": 0.1}},
            metrics={"knn_top1": knn, "linear_top1": 0.9},
            champion_metric="knn_top1",
            lineage={"git_commit": "abc", "dataset_sha256": "0" * 64},
            example=example,
            feature_dim=dim,
        )
        champion = registration.champion
        aliases.append((registration.version, registration.alias, champion and champion.score))
    assert aliases == [("1", "champion", None), ("2", "challenger", 0.5), ("3", "champion", 0.5)]

    def register(knn: float, dataset: str, params: dict):
        path = tmp_path / f"encoder-{knn}.pt"
        save_encoder(Encoder(ModelConfig(width=0.25), mean=[0.5] * 3, std=[0.25] * 3), path, [16, 16])
        return register_encoder(
            path,
            config,
            tmp_path,
            params=params,
            metrics={"knn.val.k20.top1": knn, "knn_top1": knn, "linear_top1": 0.1},
            champion_metric="knn_top1",
            lineage={"git_commit": "abc", "dataset_sha256": dataset},
            example=example,
            feature_dim=dim,
        )

    # The same data under another root is the same score: a worse version stays the challenger.
    moved = register(0.1, "0" * 64, {"train": {"lr": 0.1}, "data": {"root": "/elsewhere"}})
    assert (moved.alias, moved.champion.score) == ("challenger", 0.6)
    # A score on other data cannot be compared: even a higher one waits for `promote`.
    other_data = register(0.9, "1" * 64, {"train": {"lr": 0.1}})
    assert (other_data.version, other_data.alias) == ("5", "challenger")
    assert (other_data.champion.version, other_data.champion.score, other_data.champion.differs) == (
        "3",
        None,
        ["eval_dataset_sha256"],
    )

    assert (tmp_path / "mlflow.db").exists() and (tmp_path / "mlartifacts").is_dir()  # all inside root
    client = mlflow.MlflowClient()
    assert str(client.get_model_version_by_alias("test-encoder", "challenger").version) == "5"
    tags = client.get_model_version("test-encoder", "3").tags
    assert tags["git_commit"] == "abc" and tags["params.train.lr"] == "0.1" and tags["metrics.knn_top1"] == "0.600000"
    assert promote(config, tmp_path, "5") == "3"  # the explicit act
    assert client.get_registered_model("test-encoder").aliases == {"champion": 5}
    with pytest.raises(TrackingError, match=r"test-encoder has no version 9 \(versions: 1, 2, 3, 4, 5\)"):
        promote(config, tmp_path, "9")

    model = mlflow.pyfunc.load_model("models:/test-encoder@champion")
    embeddings = model.predict(example)
    assert embeddings.shape == (2, dim) and embeddings.dtype == np.float32
    with pytest.raises(Exception, match="uint8|dtype"):
        model.predict(example.astype(np.float64))  # the signature rejects what the encoder can't take


def test_tracking_uri_env_overrides_params(tmp_path, monkeypatch):
    from selfsup.tracking import resolve_tracking_uri

    config = MlflowConfig()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(config, tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri(config, tmp_path) == "http://127.0.0.1:5000"


@pytest.mark.parametrize(
    "address, reason",
    [("127.0.0.1:abc", "not a host:port address"), ("127.0.0.1:1", "refused"), (":6379", "no host")],
)
def test_unreachable_or_malformed_addresses_are_named(address, reason):
    from selfsup.errors import RayClusterError
    from selfsup.reachability import unreachable
    from selfsup.train.ray_trainer import connect_ray

    assert reason in unreachable(address, default_port=6379)
    assert unreachable("127.0.0.1:1", default_port=6379) is not None
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_ADDRESS", address)
        with pytest.raises(RayClusterError, match=f"RAY_ADDRESS={address} is unreachable"):
            connect_ray()


def test_a_score_is_defined_by_the_data_and_its_protocols_keys():
    from selfsup.tracking import score_definition

    tags = {"dataset_sha256": "0" * 64, "params.data.root": "/a", "params.eval.knn.temperature": "0.07"}
    knn = score_definition(tags, "knn.val.k20.top1")
    # A version from before eval.data was evaluated on its pretraining data: that data's hash stands for both.
    assert knn == {"eval_dataset_sha256": "0" * 64, "params.eval.knn.temperature": "0.07"}  # not data.root, not k
    # Labelled scores are made on the evaluation data, RankMe on the pretraining data's held-out images.
    apart = {**tags, "eval_dataset_sha256": "e" * 64}
    assert score_definition({**apart, "dataset_sha256": "1" * 64}, "knn.val.k20.top1") == score_definition(
        apart, "knn.val.k20.top1"
    )
    assert score_definition(apart, "pretrain.rankme") == {"dataset_sha256": "0" * 64}
    assert score_definition({**apart, "eval_dataset_sha256": "f" * 64}, "pretrain.rankme") == {
        "dataset_sha256": "0" * 64
    }
    assert score_definition({**tags, "params.data.root": "/b"}, "knn.val.k20.top1") == knn
    assert score_definition({**tags, "params.eval.knn.temperature": "0.1"}, "knn.val.k20.top1") != knn
    linear = {**tags, "params.eval.linear.lr": "0.01", "params.eval.seeds": "[0, 1]"}
    assert set(score_definition(linear, "linear.val.top1.mean")) == {
        "eval_dataset_sha256",
        "params.eval.linear.lr",
        "params.eval.seeds",
    }


RACER = """
import sys, time
import numpy as np, torch
from selfsup.config import MlflowConfig, ModelConfig
from selfsup.models import Encoder, save_encoder
from selfsup.tracking import register_encoder

root, score, start = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
torch.manual_seed(int(score * 100))
path = f"{root}/encoder-{score}.pt"
encoder = Encoder(ModelConfig(width=0.25), mean=[0.5] * 3, std=[0.25] * 3)
save_encoder(encoder, path, [16, 16])
example = np.zeros((2, 16, 16, 3), dtype=np.uint8)
time.sleep(max(0.0, start - time.time()))  # both register at once
registration = register_encoder(
    path, MlflowConfig(model_name="raced"), root, params={}, metrics={"knn_top1": score}, champion_metric="knn_top1",
    lineage={"git_commit": "abc", "dataset_sha256": "0" * 64}, example=example, feature_dim=encoder.feature_dim,
)
print(registration.version, registration.alias)
"""


@pytest.mark.slow
def test_two_registrations_racing_cannot_leave_the_worse_one_champion(tmp_path, monkeypatch):
    import os
    import subprocess
    import sys
    import time

    import mlflow

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    root = tmp_path  # a better and a worse version, registered at the same instant
    start = time.time() + 12  # past both imports
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(root), score, str(start)],
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for score in ("0.4", "0.6")
    ]
    results = [racer.communicate(timeout=120) for racer in racers]
    assert all(racer.returncode == 0 for racer in racers), [err[-2000:] for _, err in results]
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("raced", "champion")
    assert client.get_run(champion.run_id).data.metrics["knn_top1"] == 0.6, results
