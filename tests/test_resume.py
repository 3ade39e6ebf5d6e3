"""An interrupted `pretrain` stage, its driver killed mid-run on a Ray cluster, resumes from its latest checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from tests.conftest import run, update_params

pytestmark = pytest.mark.slow


def test_killed_pretrain_resumes_from_the_latest_checkpoint(tiny_repo):
    repo, env = tiny_repo
    update_params(repo, {"train": {"epochs": 6, "checkpoint_every": 2}})
    assert run(["dvc", "repro", "prepare"], repo, env).returncode == 0

    stage = subprocess.Popen(
        ["python", "-m", "pipelines.pretrain"],
        cwd=repo,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoints = repo / "checkpoints"
    deadline = time.monotonic() + 240
    try:
        while not list(checkpoints.glob("*/checkpoint_*")) and time.monotonic() < deadline:
            assert stage.poll() is None, "pretrain ended before its first checkpoint"
            time.sleep(0.5)
        time.sleep(1)  # let the checkpoint land whole
    finally:
        os.killpg(stage.pid, signal.SIGKILL)  # the driver; the cluster then ends the workers of its job
        stage.wait()
    assert list(checkpoints.glob("*/checkpoint_*")), "no checkpoint within the deadline"

    resumed = run(["python", "-m", "pipelines.pretrain"], repo, env)
    assert resumed.returncode == 0, resumed.output
    assert "resuming from the checkpoint of epoch" in resumed.output
    first_epoch_run = int(resumed.output.split("resuming from the checkpoint of epoch ")[1].split("/")[0]) + 1
    assert f"epoch {1:>3}/6" not in resumed.output and f"epoch {first_epoch_run:>3}/6" in resumed.output
    metrics = json.loads((repo / "metrics" / "pretrain.json").read_text())
    assert metrics["epochs"] == 6  # the history survived the interruption
    assert len((repo / "plots" / "pretrain.csv").read_text().splitlines()) == 7
    assert [p.name for p in checkpoints.iterdir()] == ["README"]  # a finished run cleans up
