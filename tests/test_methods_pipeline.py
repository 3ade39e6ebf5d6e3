"""Every method runs through `dvc repro` (Ray Train pretraining) with tiny params.

The stages after pretrain read only models/encoder.pt, whose format no method changes; they run for
SimCLR in test_pipeline.py and are skipped here, and the runs share one Ray cluster through RAY_ADDRESS
rather than each starting its own instance: both to keep the suite's time."""

from __future__ import annotations

import json

import pytest
import torch

from selfsup.methods import METHODS
from selfsup.models import load_encoder
from tests.conftest import ray_cluster, run, update_params
from tests.test_methods_training import SMALL_KNOBS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_address(tiny_repo):
    with ray_cluster(tiny_repo[1], node_cpus=[2]) as address:
        yield address


@pytest.mark.parametrize("method", [name for name in METHODS if name != "simclr"])  # simclr: test_pipeline.py
def test_method_runs_through_dvc_repro(tiny_repo, ray_address, method: str) -> None:
    repo, env = tiny_repo
    update_params(repo, {"method": {"name": method, method: SMALL_KNOBS[method]}, "train": {"epochs": 1}})
    result = run(["dvc", "repro", "pretrain"], repo, {**env, "RAY_ADDRESS": ray_address})
    assert result.returncode == 0, result.output[-3000:]
    assert "Running stage 'pretrain'" in result.output
    assert "epoch   1/1  loss" in result.output
    history = (repo / "plots" / "pretrain.csv").read_text().splitlines()
    assert history[0].split(",")[-2:] == ["embedding_std", "effective_rank"] and len(history) == 2
    encoder, image_size = load_encoder(repo / "models" / "encoder.pt")
    assert image_size == [16, 16]
    assert torch.isfinite(encoder(torch.rand(2, 3, 16, 16))).all()
    assert json.loads((repo / "metrics" / "pretrain.json").read_text())["epochs"] == 1
