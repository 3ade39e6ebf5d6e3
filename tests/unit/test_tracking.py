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

    from selfsup.tracking import register_encoder

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
        aliases.append((registration.version, registration.alias, registration.previous_champion_score))
    assert aliases == [("1", "champion", None), ("2", "challenger", 0.5), ("3", "champion", 0.5)]

    # Scores on other data are not comparable: a worse number there still starts a new line of champions.
    other_data = register_encoder(
        path,
        config,
        tmp_path,
        params={"train": {"lr": 0.1}},
        metrics={"knn_top1": 0.1, "linear_top1": 0.1},
        champion_metric="knn_top1",
        lineage={"git_commit": "abc", "dataset_sha256": "1" * 64},
        example=example,
        feature_dim=dim,
    )
    assert (other_data.version, other_data.alias, other_data.previous_champion_score) == ("4", "champion", None)

    assert (tmp_path / "mlflow.db").exists() and (tmp_path / "mlartifacts").is_dir()  # all inside root
    client = mlflow.MlflowClient()
    assert str(client.get_model_version_by_alias("test-encoder", "challenger").version) == "2"
    tags = client.get_model_version("test-encoder", "3").tags
    assert tags["git_commit"] == "abc" and tags["params.train.lr"] == "0.1" and tags["metrics.knn_top1"] == "0.600000"

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
