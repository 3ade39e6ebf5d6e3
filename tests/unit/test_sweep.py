"""A sweep's parts that need no Ray cluster: its search space checked against params, each trial's params, the
results, the flags it prints and reads, its folder, and the trial-order ASHA that makes a seeded sweep repeatable."""

from __future__ import annotations

import copy
import csv
import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import yaml

from selfsup.dotted import flatten, nested
from selfsup.errors import ConfigError
from selfsup.params import load_params
from selfsup.sweep import (
    PENDING,
    SWEEP_MARKER,
    RungTrial,
    TrialResult,
    adopt_flags,
    asha_rungs,
    check_fresh_start,
    check_search_space,
    ordered_asha,
    parse_set_flags,
    set_flags,
    sorted_trials,
    start_afresh,
    trial_params,
    write_best_params,
    write_trials_csv,
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


def run_stage(repo, tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipelines.tune", *args],
        cwd=repo,
        env=stage_env(tmp_path, repo),
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("name", ["..", ".", "/etc", "../sweeps", "a/b", ""])
def test_a_sweep_name_must_stay_inside_the_storage_folder(name):
    raw = copy.deepcopy(REPO_PARAMS)
    raw["tune"]["name"] = name
    with pytest.raises(ConfigError) as caught:
        load_params(raw)
    [line] = str(caught.value).splitlines()
    assert line.startswith(f"params.yaml: tune.name={name!r} is invalid: must be a folder name inside")


def test_the_stage_refuses_a_name_that_leaves_the_folder_or_a_folder_it_did_not_make_and_deletes_nothing(tmp_path):
    """`tune.name: ..` once meant `rm -r sweeps/`; `/etc` or a folder of the user's must survive likewise."""
    repo = copy_repo(tmp_path / "repo")
    (repo / "sweeps" / "ray").mkdir(parents=True)
    sentinels = [repo / "sweeps" / "keep.txt", repo / "sweeps" / "ray" / "keep.txt"]
    mine = tmp_path / "mine"
    (mine / "sweep").mkdir(parents=True)
    sentinels.append(mine / "sweep" / "keep.txt")  # a folder of the user's where a sweep would go
    for sentinel in sentinels:
        sentinel.write_text("keep")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["tune"]["name"] = ".."
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    lines = {}
    lines[".."] = run_stage(repo, tmp_path)  # from params.yaml
    lines["/etc"] = run_stage(repo, tmp_path, "-S", "tune.name=/etc")  # from the command line
    lines["mine"] = run_stage(repo, tmp_path, "-S", "tune.name=sweep", "-S", f"tune.storage_path={mine}")
    for case, result in lines.items():
        assert result.returncode == 2, (case, result.stderr)
        [line] = result.stderr.strip().splitlines()
        if case == "mine":
            assert line == (
                f"error: {mine}/sweep exists and is not a sweep selfsup started, so it is left alone: set tune.name "
                "to another name (e.g. -S tune.name=...), or remove that folder yourself"
            )
        else:
            assert line.startswith(f"error: params.yaml: tune.name={case!r} is invalid: must be a folder name inside")
    assert all(sentinel.read_text() == "keep" for sentinel in sentinels)
    assert (repo / "sweeps" / "dvc.yaml").is_file() and (repo / "params.yaml").is_file()


def test_only_a_folder_marked_as_a_sweep_is_deleted_to_start_afresh(tmp_path):
    fresh = tmp_path / "fresh"
    start_afresh(str(fresh))  # a new sweep's folder is marked before Ray writes into it
    assert (fresh / SWEEP_MARKER).is_file()
    (fresh / "experiment_state-old.json").write_text("{}")
    start_afresh(str(fresh))  # the previous sweep of the same name goes
    assert sorted(p.name for p in fresh.iterdir()) == [SWEEP_MARKER]

    tuned_elsewhere = tmp_path / "other"  # Ray Tune's state alone: any Tune experiment has one
    tuned_elsewhere.mkdir()
    (tuned_elsewhere / "experiment_state-x.json").write_text("{}")
    linked = tmp_path / "linked"
    linked.symlink_to(fresh)
    a_file = tmp_path / "a_file"
    a_file.write_text("keep")
    for path in (tuned_elsewhere, linked, a_file):
        with pytest.raises(ConfigError, match="is not a sweep selfsup started, so it is left alone"):
            start_afresh(str(path))
    assert (tuned_elsewhere / "experiment_state-x.json").is_file() and a_file.read_text() == "keep"
    assert (fresh / SWEEP_MARKER).is_file()
    check_fresh_start("s3://bucket/sweeps/x")  # a URI is never deleted from here


def shell_words(text: str) -> list[str]:
    """What `cmd $(printf %s TEXT)` hands `cmd`: bash's own word splitting (and globbing) of a substitution."""
    script = 'for word in $(printf %s "$1"); do printf "%s\\n" "$word"; done'
    return subprocess.run(["bash", "-c", script, "_", text], capture_output=True, text=True, check=True).stdout.split(
        "\n"
    )[:-1]


def test_adopt_flags_stay_whole_through_word_splitting_and_read_back_as_dvc_reads_them(tmp_path):
    from dvc.utils.hydra import apply_overrides
    from ruamel.yaml import YAML

    winner = {
        "views.crop_scale": [0.2, 1.0],
        "train.lr": 1.0e-05,
        "method.name": "byol",
        "model.backbone": "1.0",  # a string that would read back as a number
        "data.root": "on",  # ... or as a boolean in YAML 1.1
        "train.epochs": 20,
        "model.zero_init_residual": True,
    }
    path = tmp_path / "best_params.yaml"
    write_best_params(TrialResult("t", winner, 0.9, 4, "completed"), "monitor_knn_top1", path)
    flags = adopt_flags(path)
    assert "-S views.crop_scale=[0.2,1.0]" in flags
    words = shell_words(flags)
    assert words[0::2] == ["-S"] * len(winner)
    pairs = words[1::2]
    assert sorted(pair.split("=", 1)[0] for pair in pairs) == sorted(winner)
    assert parse_set_flags(pairs) == winner  # Hydra's grammar, as `dvc exp run -S` reads it
    params = tmp_path / "params.yaml"  # and DVC itself, changing a params.yaml that holds those keys
    params.write_text(yaml.safe_dump(nested({key: 0 for key in winner})))
    apply_overrides(str(params), pairs)
    # DVC writes YAML 1.2 (ruamel): read back the same way (PyYAML's YAML 1.1 reads its `1e-05` as a string)
    assert flatten(YAML(typ="safe").load(params.read_text())) == winner

    with pytest.raises(ConfigError, match=r"data.root='a b' holds whitespace, which `\$\(...\)` would split"):
        set_flags({"data.root": "a b"})


def test_recipes_print_their_flags_with_the_same_formatter():
    from pipelines.recipe import recipe_overrides

    overrides = recipe_overrides("cifar10", "swav")
    words = shell_words(set_flags(overrides))
    assert "views.crop_scale=[0.2,1.0]" in words and len(words) == 2 * len(overrides)
    assert parse_set_flags(words[1::2]) == overrides


def test_command_line_params_override_params_yaml_and_are_checked_as_it_is(tmp_path):
    from pipelines.tune import read_params_with

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(REPO_PARAMS, sort_keys=False))
    params = read_params_with(["tune.num_samples=4", "tune.name=lr", "train.lr=1e-3", "tune.scheduler=fifo"], path)
    assert (params.tune.num_samples, params.tune.name, params.tune.scheduler) == (4, "lr", "fifo")
    assert params.train.lr == 0.001  # 1e-3 is a number, as Hydra (dvc exp run -S) reads it; YAML 1.1 would not
    space = read_params_with(["tune.space={train.lr: {loguniform: [0.01, 0.1]}}"], path).tune.space
    assert space == {"train.lr": {"loguniform": [0.01, 0.1]}}

    bad = copy.deepcopy(REPO_PARAMS)
    bad["tune"]["num_samples"] = 0
    with pytest.raises(ConfigError) as in_file:
        load_params(bad)
    with pytest.raises(ConfigError) as on_command_line:
        read_params_with(["tune.num_samples=0"], path)
    assert str(on_command_line.value) == str(in_file.value) and len(str(in_file.value).splitlines()) == 1
    for flag, expected in [
        ("tune.num_samples", "-S tune.num_samples: not key=value"),
        ("tune.num_samples=1,2", "-S tune.num_samples=1,2: give one value as key=value"),
        ("~tune.seed", "-S ~tune.seed: give one value as key=value"),
        ("tune.name.x=1", "-S tune.name.x: params.yaml's tune.name is a value, not a section"),
        ("tune.nam=x", "params.yaml: tune.nam is not a known key"),
    ]:
        with pytest.raises(ConfigError) as caught:
            read_params_with([flag], path)
        [line] = str(caught.value).splitlines()
        assert line.startswith(expected), line


def test_trials_csv_names_the_node_each_trial_ran_on(tmp_path):
    trial = TrialResult("a", {"train.lr": 0.1}, 0.8, 4, "completed", node_ip="10.0.0.7", node_id="f00d")
    write_trials_csv([trial], ["train.lr"], "monitor_knn_top1", tmp_path / "trials.csv")
    [row] = list(csv.DictReader(open(tmp_path / "trials.csv")))
    assert (row["node_ip"], row["node_id"], row["train.lr"]) == ("10.0.0.7", "f00d", "0.1")


# Trial-order ASHA (tune.scheduler: asha): the decisions of the sweep run one trial at a time, however reports come.

EPOCHS, GRACE, FACTOR = 8, 1, 2


def curves(seed: int, trials: int = 10) -> list[np.ndarray]:
    """Seeded learning curves (one value per epoch) of different heights and slopes."""
    rng = np.random.default_rng(seed)
    return [np.cumsum(rng.uniform(0, 1, EPOCHS)) * rng.uniform(0.5, 1.5) for _ in range(trials)]


def test_trial_order_asha_decides_as_rays_asha_does_when_trials_run_one_at_a_time():
    from ray.tune.schedulers import ASHAScheduler

    for seed in range(10):
        ray_asha = ASHAScheduler(
            time_attr="epoch", metric="m", mode="max", max_t=EPOCHS, grace_period=GRACE, reduction_factor=FACTOR
        )
        by_ray = []
        for index, curve in enumerate(curves(seed)):
            trial = SimpleNamespace(trial_id=str(index))
            ray_asha.on_trial_add(None, trial)
            stop = None
            for epoch in range(1, EPOCHS + 1):
                if ray_asha.on_trial_result(None, trial, {"epoch": epoch, "m": curve[epoch - 1]}) == "STOP":
                    stop = epoch if epoch < EPOCHS else None  # Ray "stops" every trial at max_t
                    break
            ray_asha.on_trial_complete(None, trial, {"epoch": epoch, "m": curve[epoch - 1]})
            by_ray.append(stop)
        trials = [RungTrial([(e, c[e - 1]) for e in range(1, EPOCHS + 1)], ended=True) for c in curves(seed)]
        decisions = ordered_asha(trials, asha_rungs(EPOCHS, GRACE, FACTOR), FACTOR, "max", EPOCHS)
        assert [None if d is None else d + 1 for d in decisions] == by_ray, seed
        assert any(by_ray), seed


def test_a_decision_waits_for_the_earlier_trials_reports_at_its_rung():
    rungs = asha_rungs(EPOCHS, GRACE, FACTOR)
    assert rungs == [1, 2, 4]
    first = RungTrial([(1, 0.5)])  # still running, not yet at rung 2
    second = RungTrial([(1, 0.4), (2, 0.1)])  # worse than the first at rung 1: stops there
    third = RungTrial([(1, 0.9), (2, 0.1)])  # better at rung 1; at rung 2 it needs the first trial's value
    assert ordered_asha([first, second, third], rungs, FACTOR, "max", EPOCHS) == [None, 0, PENDING]
    first.reports.append((2, 0.6))
    assert ordered_asha([first, second, third], rungs, FACTOR, "max", EPOCHS) == [None, 0, 1]
    first.ended = True  # for "min", lower is better: the second trial leads at rung 1
    assert ordered_asha([first, second, third], rungs, FACTOR, "min", EPOCHS) == [None, None, 0]


def simulate(scheduler, trial_curves: list[np.ndarray], concurrency: int, seed: int) -> list[list[dict]]:
    """Tune's part, by hand: trials start in creation order, at most `concurrency` at once, and report every
    epoch in a random interleaving; a STOP ends a trial. Returns each trial's reports."""
    rng = np.random.default_rng(seed)
    trials = [SimpleNamespace(trial_id=f"t{i}", status="PENDING", has_reported_at_least_once=False) for i in range(10)]
    reports: list[list[dict]] = [[] for _ in trials]
    waiting, running = list(range(len(trials))), []
    while waiting or running:
        while waiting and len(running) < concurrency:
            running.append(waiting.pop(0))
            scheduler.on_trial_add(None, trials[running[-1]])
        index = running[rng.integers(len(running))]
        epoch = len(reports[index]) + 1
        result = {"epoch": epoch, "m": float(trial_curves[index][epoch - 1]), "node_ip": "127.0.0.1", "node_id": "n"}
        reports[index].append(result)
        if scheduler.on_trial_result(None, trials[index], result) == "STOP" or epoch == EPOCHS:
            scheduler.on_trial_complete(None, trials[index], result)
            running.remove(index)
    return reports


def test_a_seeded_sweep_stops_the_same_trials_and_picks_the_same_winner_however_reports_interleave():
    from selfsup.train.ray_tune import OrderedAsha, trial_results

    raw = copy.deepcopy(REPO_PARAMS)
    raw["tune"].update(epochs=EPOCHS, metric="loss", mode="max", asha={"grace_period": GRACE, "reduction_factor": 2})
    config = load_params(raw).tune  # "loss" with mode max stands for any metric: the values are made up
    trial_curves = curves(seed=3)
    outcomes, ran_past_their_stop = [], 0
    for concurrency, seed in [(1, 0), (2, 0), (3, 1), (4, 2), (10, 3), (3, 4)]:
        scheduler = OrderedAsha(EPOCHS, GRACE, FACTOR)
        scheduler.set_search_properties("m", "max")
        reports = simulate(scheduler, trial_curves, concurrency, seed)
        results = [
            SimpleNamespace(
                metrics={**r[-1], "loss": r[-1]["m"], "trial_id": f"t{i}"},
                metrics_dataframe=pd.DataFrame([{**row, "loss": row["m"]} for row in r]),
                error=None,
                path=f"/sweep/t{i}",
                config={key: i for key in config.space},
            )
            for i, r in enumerate(reports)
        ]
        table = trial_results(results, config)
        outcomes.append([(t.trial_id, t.status, t.epochs, t.metric) for t in sorted_trials(table, "max")])
        ran_past_their_stop += sum(len(r) > t.epochs for r, t in zip(reports, table))
    assert all(outcome == outcomes[0] for outcome in outcomes), outcomes
    statuses = [status for _, status, _, _ in outcomes[0]]
    assert "stopped early" in statuses and "completed" in statuses
    assert ran_past_their_stop  # some trials waited on an earlier one, ran on, and were read where they stopped


def test_every_epoch_reaches_the_trials_mlflow_run_once_even_when_a_resumed_trial_redoes_some(tmp_path, monkeypatch):
    import mlflow
    import ray
    import torch

    from selfsup.config import MlflowConfig
    from selfsup.tracking import TrialRuns, sweep_parent_run, use_experiment
    from selfsup.train import ray_tune

    class FakeTune:  # Ray Tune's `report`/`get_checkpoint`/`Checkpoint`, in this process
        reported: list[dict] = []

        class Checkpoint:
            @staticmethod
            def from_directory(folder):
                return folder

        @staticmethod
        def get_checkpoint():
            return None

        @classmethod
        def report(cls, metrics, checkpoint=None):
            cls.reported.append(metrics)

    monkeypatch.setattr(ray_tune, "tune", FakeTune)
    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(get_node_id=lambda: "node-1"))
    session = ray_tune.TuneSession(torch.device("cpu"))
    assert session.latest_checkpoint() is None
    history = []
    for epoch in range(1, 7):  # the loop reports at its checkpoints, here every 2 epochs (the monitor's)
        row = {"epoch": epoch, "loss": 1.0 / epoch, "lr": 0.1}
        if epoch % 2 == 0:
            row["monitor_knn_top1"] = epoch / 10
        history.append(row)
        if epoch % 2 == 0:
            session.report(row, {"history": list(history), "epoch": epoch})
    assert [[r["epoch"] for r in json.loads(m["history"])] for m in FakeTune.reported] == [[1, 2], [3, 4], [5, 6]]
    assert all(m["node_id"] == "node-1" and m["started_at"] <= m["reported_at"] for m in FakeTune.reported)

    previous = mlflow.get_tracking_uri()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    try:
        config = MlflowConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
        parent = sweep_parent_run(config, tmp_path, "sweeps/ray/s", {"tune": {"epochs": 6}}, resume=False)
        experiment = use_experiment(config, tmp_path)
        trial = SimpleNamespace(trial_id="t0", config={"train.lr": 0.1})
        callback = ray_tune.MlflowTrials(TrialRuns(experiment, parent))
        callback.on_trial_start(0, [], trial)
        for result in FakeTune.reported[:2]:
            callback.on_trial_result(0, [], trial, {**result, "epoch": result["epoch"]})
        resumed = ray_tune.MlflowTrials(TrialRuns(experiment, parent))  # the driver restarted: the trial redoes
        resumed.on_trial_start(0, [], trial)  # epochs 3-4 from its checkpoint of epoch 2, then goes on
        redone = {**FakeTune.reported[1], "history": json.dumps(history[2:4])}
        for result in (redone, FakeTune.reported[2]):
            resumed.on_trial_result(0, [], trial, result)
        client = mlflow.MlflowClient()
        run_id = resumed.runs.run_ids["t0"]
        steps = {key: [m.step for m in client.get_metric_history(run_id, key)] for key in ("loss", "monitor_knn_top1")}
    finally:
        mlflow.set_tracking_uri(previous)
    assert steps == {"loss": [1, 2, 3, 4, 5, 6], "monitor_knn_top1": [2, 4, 6]}


def test_the_search_holds_max_concurrent_trials_itself():
    from selfsup.train.ray_tune import search_algorithm

    raw = copy.deepcopy(REPO_PARAMS)
    raw["tune"]["max_concurrent_trials"] = 3
    assert search_algorithm(load_params(raw).tune).max_concurrent == 3
    raw["tune"]["max_concurrent_trials"] = None
    assert search_algorithm(load_params(raw).tune).max_concurrent == 0  # no limit


def test_a_resumed_sweeps_scheduler_rereads_each_trials_reports_and_waits_on_what_it_cannot_read(tmp_path):
    from pyarrow.fs import LocalFileSystem

    from selfsup.train.ray_tune import OrderedAsha

    def restored(name: str, lines: list[str], status: str = "TERMINATED"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "result.json").write_text("\n".join(lines) + "\n")
        storage = SimpleNamespace(storage_filesystem=LocalFileSystem())
        return SimpleNamespace(
            trial_id=name, status=status, has_reported_at_least_once=True, storage=storage, path=str(tmp_path / name)
        )

    scheduler = OrderedAsha(EPOCHS, GRACE, FACTOR)
    scheduler.set_search_properties("m", "max")
    rows = [{"epoch": 1, "m": 0.5}, {"epoch": 2, "m": 0.6}, {"epoch": 2, "m": 0.6}]  # epoch 2 redone once
    scheduler.on_trial_add(None, restored("t0", [json.dumps(row) for row in rows]))
    scheduler.on_trial_add(None, restored("t1", ["{not json"], status="PENDING"))
    assert scheduler.trials["t0"].reports == [(1.0, 0.5), (2.0, 0.6)] and scheduler.trials["t0"].ended
    assert scheduler.trials["t1"].unknown  # unreadable: trials after it wait rather than guess
    fresh = SimpleNamespace(trial_id="t2", status="PENDING", has_reported_at_least_once=False)
    scheduler.on_trial_add(None, fresh)
    assert scheduler.on_trial_result(None, fresh, {"epoch": 1, "m": 0.1}) == "CONTINUE"
    assert scheduler.decision("t2") == PENDING


def test_a_labelled_sweep_metric_on_unlabelled_data_stops_in_one_line_before_ray_starts(tmp_path):
    """kNN on val's labels: with -1 for every label each trial would crash instead. RankMe needs none."""
    from selfsup.config import DataConfig
    from selfsup.data.sources import prepare_dataset
    from tests.unit.data.test_unlabelled_sources import make_tree

    repo = copy_repo(tmp_path / "repo")
    images = tmp_path / "images"
    make_tree(images)
    prepare_dataset(DataConfig(source="folder", root=str(images), image_size=8), repo / "data" / "prepared")
    unlabelled = ["-S", "data.source=folder", "-S", f"data.root={images}", "-S", "mlflow.champion_metric=rankme"]
    result = run_stage(repo, tmp_path, *unlabelled, "-S", "tune.metric=monitor_knn_top1")
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(
        "error: params.yaml: tune.metric=monitor_knn_top1 needs labelled evaluation data, and data.source=folder has "
        "no labels and eval.data is not set: set tune.metric: monitor_rankme (label-free), or eval.data"
    )
    assert not (repo / "sweeps" / "ray").exists()  # nothing started
