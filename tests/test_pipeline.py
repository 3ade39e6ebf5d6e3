"""The whole pipeline, for real: `dvc repro` with Ray Train, MLflow's registry, and DVC's caching.

The tests of this module run in order on one private copy of the repository.
"""

from __future__ import annotations

import json
import re
import socket

import numpy as np
import pytest

from tests.conftest import run, update_params
from tests.test_methods_training import SMALL_KNOBS

pytestmark = pytest.mark.slow
STAGES = ["prepare", "pretrain", "features", "eval_knn", "eval_linear", "register"]


def ran_stages(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


def read_json(path) -> dict:
    return json.loads(path.read_text())


def test_repro_runs_every_stage_and_registers_a_loadable_encoder(tiny_repo):
    repo, env = tiny_repo
    result = run(["dvc", "repro"], repo, env)
    assert result.returncode == 0, result.output
    assert ran_stages(result.output) == STAGES

    for name in ("eval_knn", "eval_linear"):
        metrics = read_json(repo / "metrics" / f"{name}.json")
        assert 0.1 < metrics["top1"] <= 1 and 0 < metrics["baseline_top1"] <= 1
    pretrain = read_json(repo / "metrics" / "pretrain.json")
    assert pretrain["epochs"] == 2 and np.isfinite(pretrain["final_loss"])
    curve = (repo / "plots" / "pretrain.csv").read_text().splitlines()
    assert curve[0].startswith("epoch,loss,lr,images_per_s") and len(curve) == 3
    assert "epoch   2/2  loss" in result.output  # one readable progress line per epoch

    registration = read_json(repo / "models" / "registration.json")
    assert (registration["version"], registration["alias"]) == ("1", "champion")

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model(f"models:/{registration['name']}@champion")
    images = np.load(repo / "data" / "prepared" / "test.npz")["images"][:7]
    embeddings = model.predict(images)
    features = np.load(repo / "features" / "features.npz")["pretrained_test"][:7]
    assert embeddings.shape == features.shape and embeddings.dtype == np.float32
    np.testing.assert_allclose(embeddings, features, rtol=1e-4, atol=1e-5)  # the very encoder evaluated
    other_size = model.predict(np.random.default_rng(0).integers(0, 255, (3, 40, 40, 3), dtype=np.uint8))
    assert other_size.shape == (3, features.shape[1])  # resized to the training size

    version = mlflow.MlflowClient().get_model_version(registration["name"], "1")
    assert len(version.tags["dataset_sha256"]) == 64 and version.tags["git_commit"]
    assert version.tags["params.train.epochs"] == "2" and "metrics.knn_top1" in version.tags

    metrics = json.loads(run(["dvc", "metrics", "show", "--json"], repo, env).stdout)
    shown = json.dumps(metrics)
    assert "baseline_top1" in shown and "top1" in shown


def test_second_repro_runs_nothing(tiny_repo):
    repo, env = tiny_repo
    result = run(["dvc", "repro"], repo, env)
    assert result.returncode == 0, result.output
    assert ran_stages(result.output) == []
    status = run(["dvc", "status"], repo, env)
    assert "up to date" in status.output, status.output


def test_switching_the_method_reruns_pretrain_and_what_follows_only(tiny_repo):
    """A changed pretrain param (here the method itself: BYOL, with an EMA teacher) re-runs pretrain and every
    stage after it, and only those."""
    repo, env = tiny_repo
    first = read_json(repo / "models" / "registration.json")
    update_params(repo, {"method": {"name": "byol", "byol": SMALL_KNOBS["byol"]}})
    result = run(["dvc", "repro"], repo, env)
    assert result.returncode == 0, result.output
    assert ran_stages(result.output) == STAGES[1:]  # not prepare

    second = read_json(repo / "models" / "registration.json")
    assert second["version"] == "2"
    # `champion` moves only when the new version beats it on kNN top-1.
    expected = "champion" if second["score"] > first["score"] else "challenger"
    assert second["alias"] == expected and second["previous_champion_score"] == first["score"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket closes


def test_unreachable_ray_cluster_fails_fast_with_the_fix(tiny_repo):
    repo, env = tiny_repo
    address = f"127.0.0.1:{_closed_port()}"
    result = run(["python", "-m", "pipelines.pretrain"], repo, {**env, "RAY_ADDRESS": address}, timeout=60)
    assert result.returncode == 2
    assert f"RAY_ADDRESS={address} is unreachable" in result.stderr and "Traceback" not in result.stderr
    assert (repo / "models" / "encoder.pt").exists()  # nothing already written is lost


def test_unreachable_mlflow_server_fails_fast_with_the_fix(tiny_repo):
    repo, env = tiny_repo
    uri = f"http://127.0.0.1:{_closed_port()}"
    result = run(["python", "-m", "pipelines.register"], repo, {**env, "MLFLOW_TRACKING_URI": uri}, timeout=60)
    assert result.returncode == 2
    assert f"MLflow server at {uri} is unreachable" in result.stderr and "Traceback" not in result.stderr
    assert (repo / "models" / "registration.json").exists()


def test_bad_params_stop_the_stage_before_any_compute(tiny_repo):
    repo, env = tiny_repo
    before = (repo / "params.yaml").read_text()
    update_params(repo, {"method": {"name": "simclrr"}})
    try:
        result = run(["python", "-m", "pipelines.pretrain"], repo, env, timeout=60)
    finally:
        (repo / "params.yaml").write_text(before)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: params.yaml: method.name='simclrr' is invalid: unknown method; allowed: "
        "simclr, moco, byol, simsiam, swav, barlow_twins, dino"
    ]
