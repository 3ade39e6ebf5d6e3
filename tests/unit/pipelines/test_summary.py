"""The summary stage: one short line of test top-1, each protocol's pretrained score beside its baseline's."""

from __future__ import annotations

import json

import pytest

from pipelines import summary


def scores(top1: float, baseline: float, spread: bool) -> dict:
    if spread:
        return {"top1": {"mean": top1, "std": 0.01}, "baseline_top1": {"mean": baseline, "std": 0.02}}
    return {"top1": top1, "baseline_top1": baseline}


@pytest.fixture
def metrics(tmp_path, monkeypatch):
    files = {
        "knn": {split: {"k10": scores(0.9, 0.8, False), "k20": scores(0.85, 0.75, False)} for split in ("val", "test")},
        "linear": {"test": scores(0.95, 0.9, True)},
        "semisup": {
            frac: {"images": n, "test": scores(t, b, True)}
            for frac, n, t, b in (("10pct", 129, 0.9, 0.8), ("0.5pct", 6, 0.6, 0.4), ("1pct", 10, 0.7, 0.5))
        },
        "transfer": {"linear": scores(0.96, 0.93, True), "knn": {"k10": scores(0.8, 0.7, False)}},
    }
    for protocol, data in files.items():
        (tmp_path / f"eval_{protocol}.json").write_text(json.dumps(data))
    monkeypatch.setattr(summary, "METRICS", tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    "champion, knn", [("knn_k20_top1", ("knn20", 0.85, 0.75)), ("linear_top1", ("knn10", 0.9, 0.8))]
)
def test_the_summary_pairs_each_protocol_with_its_baseline(metrics, monkeypatch, champion, knn):
    from selfsup.params import load_params

    params = load_params({"eval": {"knn": {"k": [10, 20]}}, "mlflow": {"champion_metric": champion}})
    monkeypatch.setattr(summary, "read_params", lambda: params)
    summary.main()
    name, top1, baseline = knn
    assert json.loads((metrics / "summary.json").read_text()) == {
        name: top1,
        f"{name}_init": baseline,
        "linear": 0.95,
        "linear_init": 0.9,
        "0.5pct": 0.6,  # the smallest label fraction
        "0.5pct_init": 0.4,
        "transfer": 0.96,
        "transfer_init": 0.93,
    }
