"""Every method runs through `dvc repro` (Ray Train pretraining, features, kNN) with tiny params."""

from __future__ import annotations

import json

import pytest

from selfsup.methods import METHODS
from tests.conftest import run, update_params
from tests.test_methods_training import SMALL_KNOBS

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("method", [name for name in METHODS if name != "simclr"])  # simclr: test_pipeline.py
def test_method_runs_through_dvc_repro(tiny_repo, method: str) -> None:
    repo, env = tiny_repo
    update_params(repo, {"method": {"name": method, method: SMALL_KNOBS[method]}, "train": {"epochs": 1}})
    result = run(["dvc", "repro", "eval_knn"], repo, env)
    assert result.returncode == 0, result.output[-3000:]
    assert "Running stage 'pretrain'" in result.output and "Running stage 'eval_knn'" in result.output
    assert "epoch   1/1  loss" in result.output
    history = (repo / "plots" / "pretrain.csv").read_text().splitlines()
    assert history[0].split(",")[-2:] == ["embedding_std", "effective_rank"] and len(history) == 2
    knn = json.loads((repo / "metrics" / "eval_knn.json").read_text())
    assert 0 < knn["top1"] <= 1
