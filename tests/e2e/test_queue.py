"""Experiments through DVC's queue land in the project's one MLflow store: `dvc exp run --queue` runs each in a
temporary copy of the workspace, which vanishes with anything written inside it. Two at once (`--jobs 2`), each on
its own private Ray instance, must not break each other."""

from __future__ import annotations

import time

import pytest

from tests.conftest import TINY_PARAMS, copy_repo, run, stage_env, update_params

pytestmark = pytest.mark.slow


def test_two_queued_experiments_at_once_land_in_the_projects_registry(tmp_path):
    import mlflow

    repo = copy_repo(tmp_path / "repo")
    update_params(repo, TINY_PARAMS)
    env = stage_env(tmp_path, repo)  # no RAY_ADDRESS: each experiment starts its own Ray instance
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    assert run([*git, "commit", "-qam", "tiny"], repo, env).returncode == 0
    for name, lr in (("lr-a", "0.1"), ("lr-b", "0.2")):
        queued = run(["dvc", "exp", "run", "--queue", "--name", name, "-S", f"train.lr={lr}"], repo, env)
        assert queued.returncode == 0, queued.output
    assert run(["dvc", "queue", "start", "--jobs", "2"], repo, env).returncode == 0
    deadline = time.monotonic() + 600
    while True:
        status = run(["dvc", "queue", "status"], repo, env).output
        if "Running" not in status and "Queued" not in status:
            break
        assert time.monotonic() < deadline, status
        time.sleep(5)
    logs = {name: run(["dvc", "queue", "logs", name], repo, env).output for name in ("lr-a", "lr-b")}
    assert status.count("Success") == 2, (status, logs)

    assert not (repo / ".dvc" / "tmp" / "exps" / "mlflow.db").exists()
    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = {r.data.tags.get("dvc_experiment"): r for r in client.search_runs(experiments, "tags.stage = 'pretrain'")}
    assert set(runs) == {"lr-a", "lr-b"}, logs
    for name, pretrain in runs.items():
        assert pretrain.info.status == "FINISHED"
        assert pretrain.data.params["train.lr"] == {"lr-a": "0.1", "lr-b": "0.2"}[name]
        losses = client.get_metric_history(pretrain.info.run_id, "loss")
        assert sorted(m.step for m in losses) == list(range(1, TINY_PARAMS["train"]["epochs"] + 1))
    versions = client.search_model_versions("name = 'selfsup-encoder'")
    assert sorted(v.run_id for v in versions) == sorted(r.info.run_id for r in runs.values())
    assert client.get_registered_model("selfsup-encoder").aliases.get("champion") is not None
