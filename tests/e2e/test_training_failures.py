"""Failures stay readable and keep what they learnt: a bug in a worker is not retried and its traceback is printed
once above one line; a NaN loss leaves its MLflow run FAILED with the curves up to the stop."""

from __future__ import annotations

import pytest

from tests.conftest import changed_params, run

pytestmark = pytest.mark.slow

BUGGY_MONITOR = """
from pipelines.common import PREPARED, read_params, run_stage
from selfsup.config import ScalingConfig
from selfsup.data.arrays import Manifest, load_split
from selfsup.train.loop import PretrainSpec
from selfsup.train.monitor import Monitor
from selfsup.train.ray_trainer import pretrain_with_ray


class BuggyMonitor(Monitor):  # defined in __main__: Ray ships the class itself to the worker
    def measure(self, encoder, device, images=None):
        raise ZeroDivisionError("a bug in the monitor")


def main():
    params, manifest = read_params(), Manifest.read(PREPARED)
    train, val = load_split(PREPARED, "train"), load_split(PREPARED, "val")
    monitor = BuggyMonitor(val.images)
    spec = PretrainSpec.from_params(params, manifest)
    pretrain_with_ray(train.images, spec, ScalingConfig(max_failures=2), "checkpoints", "a-buggy-run", monitor)


run_stage(main)
"""


def test_a_bug_in_a_worker_is_not_retried_and_its_traceback_is_printed_once(tiny_repo):
    repo, env = tiny_repo
    assert run(["dvc", "repro", "prepare"], repo, env).returncode == 0
    result = run(["python", "-c", BUGGY_MONITOR], repo, env, timeout=300)
    assert result.returncode == 2, result.output
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: a Ray Train worker raised ZeroDivisionError: a bug in the monitor"), last
    assert "not retried" in last and "no checkpoint was written yet" in last  # the monitor runs before it
    assert "restarting from the latest checkpoint" not in result.output
    assert result.output.count("Traceback (most recent call last)") == 1, result.output
    assert "in measure" in result.output  # in full: down to the frame that raised


def test_a_nan_loss_leaves_a_failed_mlflow_run_with_the_curves_up_to_the_stop(tiny_repo):
    import mlflow

    repo, env = tiny_repo
    with changed_params(repo, {"train": {"lr": 1.0e6}}):  # the loss becomes NaN in the first epoch
        result = run(["dvc", "repro", "pretrain"], repo, env)
    assert result.returncode != 0 and "error: the loss became nan in epoch 1" in result.output, result.output
    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "tags.stage = 'pretrain'", order_by=["start_time DESC"]
    )
    assert runs[0].info.status == "FAILED"
    history = client.get_metric_history(runs[0].info.run_id, "embedding_std")
    assert [m.step for m in history] == [1]
