"""A sweep's parts that need no Ray: its search space checked against params, each trial's params, the results."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import yaml

from selfsup.errors import ConfigError
from selfsup.params import load_params
from selfsup.sweep import (
    TrialResult,
    adopt_flags,
    check_search_space,
    sorted_trials,
    trial_params,
    write_best_params,
)
from tests.conftest import ROOT, copy_repo, stage_env

REPO_PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


def with_space(space: dict, **tune) -> dict:
    raw = copy.deepcopy(REPO_PARAMS)
    raw["tune"] = {**raw["tune"], "space": space, **tune}
    return raw


def space_error(space: dict, **tune) -> str:
    with pytest.raises(ConfigError) as caught:
        check_search_space(load_params(with_space(space, **tune)))
    return str(caught.value)


def test_the_shipped_search_space_is_valid():
    check_search_space(load_params(REPO_PARAMS))


@pytest.mark.parametrize(
    ("space", "expected"),
    [
        ({"train.lr": {"loguniform": [1.0, 0.1]}}, "the low bound 1.0 must be below the high bound 0.1"),
        ({"train.lr": {"loguniform": [0.1, 0.1]}}, "the low bound 0.1 must be below the high bound 0.1"),
        ({"train.lr": {"loguniform": [0.0, 0.1]}}, "loguniform needs a low bound above 0"),
        (
            {"train.lr": {"lognormal": [0.1, 1.0]}},
            "unknown distribution 'lognormal'; allowed: loguniform, uniform, choice",
        ),
        ({"train.lr": {"uniform": [0.1]}}, "uniform takes [low, high], two numbers"),
        ({"train.lr": 0.3}, "must be one of"),
    ],
)
def test_a_malformed_distribution_is_named_with_its_key(space, expected):
    with pytest.raises(ConfigError) as caught:
        load_params(with_space(space))
    message = str(caught.value)
    assert len(message.splitlines()) == 1 and "tune.space.train.lr" in message
    assert expected in message


def test_a_low_bound_above_the_high_one_says_so():
    with pytest.raises(ConfigError, match="the low bound 1.0 must be below the high bound 0.1"):
        load_params(with_space({"train.lr": {"uniform": [1.0, 0.1]}}))


@pytest.mark.parametrize(
    ("space", "expected"),
    [
        ({"train.learning_rate": {"uniform": [0.1, 1.0]}}, "params.yaml has no key 'train.learning_rate'"),
        ({"method.simclr": {"choice": [1, 2]}}, "'method.simclr' is a section, not a value"),
        ({"eval.linear.lr": {"loguniform": [0.001, 0.1]}}, "which 'eval.linear.lr' does not change"),
        ({"method.simclr.temperature": {"uniform": [0.0, 1.0]}}, "the uniform value 0.0 is not allowed"),
        ({"method.name": {"choice": ["simclr", "simclrr"]}}, "the choice value 'simclrr' is not allowed"),
    ],
)
def test_a_key_or_value_params_would_reject_is_refused_before_any_trial(space, expected):
    message = space_error(space)
    assert len(message.splitlines()) == 1 and message.startswith("params.yaml: tune.space.")
    assert expected in message


def test_the_sweeps_own_epochs_must_outlast_the_warm_up():
    message = space_error({"train.lr": {"uniform": [0.1, 1.0]}}, epochs=2)  # train.warmup_epochs is 2
    assert "train.warmup_epochs=2 must be below train.epochs=2" in message


def test_a_trial_reports_exactly_when_the_monitor_measures():
    params = load_params(with_space({"train.lr": {"uniform": [0.1, 1.0]}}, epochs=6))
    trial = trial_params(params, {"train.lr": 0.5, "method.simclr.temperature": 0.3})
    assert trial.train.epochs == 6 and trial.train.lr == 0.5 and trial.method.knobs.temperature == 0.3
    assert trial.train.checkpoint_every == trial.train.monitor_every == params.train.monitor_every
    raw = with_space({"train.lr": {"uniform": [0.1, 1.0]}})
    raw["train"]["monitor_every"] = 0
    with pytest.raises(ConfigError, match="tune.metric=monitor_knn_top1 needs the monitor"):
        trial_params(load_params(raw), {})


def test_trials_sort_best_first_and_the_winner_adopts_under_params_names(tmp_path):
    trials = [
        TrialResult("a", {"train.lr": 0.1, "method.simclr.temperature": 0.2}, 0.80, 4, "completed"),
        TrialResult("b", {"train.lr": 0.5, "method.simclr.temperature": 0.5}, None, 0, "error: NaN"),
        TrialResult("c", {"train.lr": 0.3, "method.simclr.temperature": 0.4}, 0.90, 4, "completed"),
        TrialResult("d", {"train.lr": 0.9, "method.simclr.temperature": 0.1}, 0.60, 1, "stopped early"),
    ]
    assert [t.trial_id for t in sorted_trials(trials, "max")] == ["c", "a", "d", "b"]
    assert [t.trial_id for t in sorted_trials(trials, "min")] == ["d", "a", "c", "b"]
    best = sorted_trials(trials, "max")[0]
    path = tmp_path / "best_params.yaml"
    write_best_params(best, "monitor_knn_top1", path)
    assert yaml.safe_load(path.read_text()) == {"train": {"lr": 0.3}, "method": {"simclr": {"temperature": 0.4}}}
    flags = adopt_flags(path)
    assert flags == "-S train.lr=0.3 -S method.simclr.temperature=0.4"
    raw = copy.deepcopy(REPO_PARAMS)  # the flags name real params: they load back to the winner's values
    adopted = trial_params(load_params(raw), {f.split("=")[0]: float(f.split("=")[1]) for f in flags.split("-S ")[1:]})
    assert adopted.train.lr == 0.3 and adopted.method.knobs.temperature == 0.4


def test_the_stage_stops_on_a_bad_space_in_one_line_before_ray_starts(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["tune"]["space"] = {"train.lr": {"loguniform": [0.1, 1.0]}, "train.lrr": {"uniform": [0.1, 1.0]}}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.tune"],
        cwd=repo,
        env=stage_env(tmp_path, repo),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: params.yaml: tune.space.train.lrr: params.yaml has no key 'train.lrr'; use the dotted name of a "
        "value there"
    ]
    assert not (repo / "sweeps" / "ray").exists() and "Ray" not in result.stdout


def test_the_linear_probe_knobs_are_searchable_when_the_probe_judges_the_trials():
    space = {"eval.linear.lr": {"loguniform": [0.001, 0.1]}, "train.lr": {"loguniform": [0.05, 1.0]}}
    params = load_params(with_space(space, metric="monitor_linear_top1"))
    check_search_space(params)
    assert params.tune.resolved_mode == "max"
    assert trial_params(params, {"eval.linear.lr": 0.02}).eval.linear.lr == 0.02
