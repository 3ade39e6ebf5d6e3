"""Pretraining on a real two-node Ray cluster (both nodes on loopback), reached through RAY_ADDRESS."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.conftest import run, update_params

pytestmark = pytest.mark.slow


def test_pretrain_spans_both_nodes_through_ray_address(tiny_repo, two_node_cluster):
    repo, env = tiny_repo
    assert run(["dvc", "repro", "prepare"], repo, env).returncode == 0
    update_params(repo, {"scaling": {"num_workers": 2, "cpus_per_worker": 1}})
    started = time.monotonic()
    result = run(["python", "-m", "pipelines.pretrain"], repo, {**env, "RAY_ADDRESS": two_node_cluster})
    assert result.returncode == 0, result.output
    assert "Connected to Ray cluster" in result.output and time.monotonic() - started < 300
    assert json.loads((Path(repo) / "metrics" / "pretrain.json").read_text())["epochs"] == 2


def test_more_workers_than_the_cluster_has_fails_before_training(tiny_repo, two_node_cluster):
    repo, env = tiny_repo
    update_params(repo, {"scaling": {"num_workers": 4, "cpus_per_worker": 1}})
    result = run(["python", "-m", "pipelines.pretrain"], repo, {**env, "RAY_ADDRESS": two_node_cluster}, timeout=120)
    assert result.returncode == 2
    assert "scaling.num_workers=4 needs 4 CPU (1 per worker) but the Ray cluster has 2" in result.stderr
    assert "epoch " not in result.output


def test_a_worker_bigger_than_any_node_fails_before_training(tiny_repo, two_node_cluster):
    repo, env = tiny_repo
    update_params(repo, {"scaling": {"num_workers": 1, "cpus_per_worker": 2}})  # 2 CPUs in all, 1 per node
    result = run(["python", "-m", "pipelines.pretrain"], repo, {**env, "RAY_ADDRESS": two_node_cluster}, timeout=120)
    assert result.returncode == 2
    assert "scaling.cpus_per_worker=2 exceeds the largest Ray node's 1 CPU" in result.stderr
