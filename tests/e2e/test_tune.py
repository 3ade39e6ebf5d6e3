"""Ray Tune sweeps for real: the `tune` stage on the embedded digits, ASHA in trial order (the same winner twice),
MLflow's parent and child runs, max_concurrent_trials, a killed driver resumed, and a two-node cluster."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import changed_params, copy_repo, run, stage_env, update_params

pytestmark = pytest.mark.slow

TINY_SWEEP = {
    "train": {"batch_size": 128, "warmup_epochs": 0, "monitor_every": 1},
    "tune": {
        "num_samples": 4,
        "epochs": 2,
        "max_concurrent_trials": 2,
        "space": {"method.simclr.temperature": {"loguniform": [0.1, 1.0]}, "train.lr": {"loguniform": [0.001, 1.0]}},
    },
}


@pytest.fixture(scope="module")
def sweep_repo(tmp_path_factory, shared_ray_address):
    tmp = tmp_path_factory.mktemp("tune")
    repo = copy_repo(tmp / "repo")
    update_params(repo, TINY_SWEEP)
    env = {**stage_env(tmp, repo), "RAY_ADDRESS": shared_ray_address}
    assert run(["dvc", "repro", "prepare"], repo, env).returncode == 0
    return repo, env


def trials(repo: Path) -> list[dict]:
    with open(repo / "sweeps" / "trials.csv") as f:
        return list(csv.DictReader(f))


def trial_results(repo: Path, name: str = "sweep", storage: Path | None = None) -> dict[str, list[dict]]:
    """Each trial's reports as Tune recorded them (its result.json), by trial folder."""
    return {
        folder.name: [json.loads(line) for line in (folder / "result.json").read_text().splitlines()]
        for folder in ((storage or repo / "sweeps" / "ray") / name).glob("_trial_*")
        if (folder / "result.json").is_file()
    }


def finished_trials(results: dict[str, list[dict]], epochs: int) -> dict[str, int]:
    """The trials whose last report is of their last epoch, with their number of reports (a trial that has only
    begun has none yet)."""
    return {name: len(reports) for name, reports in results.items() if reports and reports[-1]["epoch"] == epochs}


def set_tune(repo: Path, **tune) -> None:
    """Replace keys of params.yaml's tune section whole (update_params would merge a new space into the old)."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["tune"].update(tune)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def most_at_once(results: dict[str, list[dict]]) -> int:
    """The most trials whose spans (their process's start to their last report) overlapped."""
    spans = [(reports[0]["started_at"], reports[-1]["reported_at"]) for reports in results.values() if reports]
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])  # an end before a start
    running = most = 0
    for _, change in events:
        running += change
        most = max(most, running)
    return most


def mlflow_runs(repo: Path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("selfsup")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("stage") == "tune"]
    children = [r for r in runs if r.data.tags.get("stage") == "tune-trial"]
    return client, parents, children


def test_a_sweep_is_a_dvc_stage_run_when_asked_where_asha_stops_poor_trials_early_and_repeats_its_winner(sweep_repo):
    """`dvc repro sweeps/dvc.yaml` runs it (a plain `dvc repro` runs the ten stages of ./dvc.yaml only, as
    test_pipeline.py checks). Two trials at a time: ASHA decides in the trials' order, so the same sweep run again
    (its name changed on the command line) stops the same trials and picks the same winner."""
    repo, env = sweep_repo
    asha = {"grace_period": 1, "reduction_factor": 2}
    tune = {"epochs": 4, "max_concurrent_trials": 2, "scheduler": "asha", "asha": asha}
    update_params(repo, {"train": {"monitor_every": 2}, "tune": tune})  # a report (and a rung) every 2 epochs
    result = run(["dvc", "repro", "sweeps/dvc.yaml"], repo, env)
    assert result.returncode == 0, result.output
    assert "Running stage 'sweeps/dvc.yaml:tune'" in result.output

    rows = trials(repo)
    assert len(rows) == 4 and {row["status"] for row in rows} <= {"completed", "stopped early"}
    assert all(row["node_ip"] and row["node_id"] for row in rows), rows
    assert most_at_once(trial_results(repo)) <= 2
    stopped = [row for row in rows if row["status"] == "stopped early"]
    assert stopped and all(int(row["epochs"]) < 4 for row in stopped), rows
    assert any(row["status"] == "completed" and int(row["epochs"]) == 4 for row in rows)
    assert json.loads((repo / "sweeps" / "best.json").read_text())["stopped_early"] == len(stopped)
    scores = [float(row["monitor_knn_top1"]) for row in rows]
    assert scores == sorted(scores, reverse=True) and all(0 < s <= 1 for s in scores)  # best first
    best = yaml.safe_load((repo / "sweeps" / "best_params.yaml").read_text())
    assert best["method"]["simclr"]["temperature"] == pytest.approx(float(rows[0]["method.simclr.temperature"]))
    assert best["train"]["lr"] == pytest.approx(float(rows[0]["train.lr"]))
    assert (repo / "sweeps" / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((repo / "sweeps" / "best.json").read_text())["trials"] == 4

    adopt = run(["python", "-m", "pipelines.tune", "--adopt"], repo, env)
    assert adopt.stdout.split() == [
        "-S",
        f"method.simclr.temperature={best['method']['simclr']['temperature']}",
        "-S",
        f"train.lr={best['train']['lr']}",
    ]

    client, parents, children = mlflow_runs(repo)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 4
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    epochs_run = {row["trial"]: int(row["epochs"]) for row in rows}
    for child in children:
        assert set(child.data.params) == {"method.simclr.temperature", "train.lr"}
        history = {
            key: [m.step for m in client.get_metric_history(child.info.run_id, key)]
            for key in ("loss", "lr", "monitor_knn_top1")
        }
        last = len(history["loss"])  # every epoch up to its last report (a trial may run past its stop)
        assert last >= epochs_run[child.data.tags["trial"]] and last % 2 == 0, history
        assert history["loss"] == history["lr"] == list(range(1, last + 1)), history
        assert history["monitor_knn_top1"] == list(range(2, last + 1, 2)), history  # each monitored epoch
    assert parents[0].data.metrics["best_monitor_knn_top1"] == pytest.approx(scores[0])
    # The same sweep again stops the same trials and picks the same winner: tests/unit/test_sweep.py, where the
    # reports' interleaving is controlled.
    update_params(repo, {"train": {"monitor_every": 1}})


def test_a_killed_sweep_judged_by_the_linear_probe_resumes_without_rerunning_finished_trials(sweep_repo):
    """One trial at a time (max_concurrent_trials: 1, though the cluster has room for two), each judged by the
    linear probe on val while searching its learning rate; the driver killed after a trial has finished, the
    resumed sweep completes the others."""
    repo, env = sweep_repo
    set_tune(
        repo,
        name="resumed",
        metric="monitor_linear_top1",
        epochs=3,
        num_samples=3,
        max_concurrent_trials=1,
        scheduler="fifo",
        space={"eval.linear.lr": {"loguniform": [0.001, 0.1]}, "train.lr": {"loguniform": [0.05, 0.5]}},
    )
    driver = subprocess.Popen(
        ["python", "-m", "pipelines.tune"],
        cwd=repo,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:  # one trial done and the next one under way
            results = trial_results(repo, "resumed")
            if finished_trials(results, epochs=3) and len(results) >= 2:
                break
            time.sleep(0.5)
        time.sleep(3)  # past one save of the sweep's state (TUNE_GLOBAL_CHECKPOINT_S=2)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    finished = finished_trials(trial_results(repo, "resumed"), epochs=3)
    assert finished, "no trial finished before the deadline"

    resumed = run(["python", "-m", "pipelines.tune", "--resume"], repo, env)
    assert resumed.returncode == 0, resumed.output
    rows = trials(repo)
    assert len(rows) == 3 and all(row["status"] == "completed" for row in rows), rows
    assert (
        all(0.1 < float(row["monitor_linear_top1"]) <= 1 for row in rows)
        and len({r["eval.linear.lr"] for r in rows}) == 3
    )
    assert "eval" in yaml.safe_load((repo / "sweeps" / "best_params.yaml").read_text())
    after = trial_results(repo, "resumed")
    assert most_at_once(after) == 1
    for name, reports in finished.items():
        assert len(after[name]) == reports, name  # a finished trial was not run again
    _, parents, children = mlflow_runs(repo)
    ours = [p for p in parents if p.data.tags["sweep"].endswith("/resumed")]
    assert len(ours) == 1 and ours[0].info.status == "FINISHED"  # the resumed sweep continued its run
    assert len([c for c in children if c.data.tags["mlflow.parentRunId"] == ours[0].info.run_id]) == 3


def test_trials_spread_over_the_nodes_of_a_cluster_into_storage_given_as_a_uri(sweep_repo, two_node_cluster, tmp_path):
    """On a cluster the sweep's state goes where every node sees it: here a file:// URI, as s3:// would be."""
    repo, env = sweep_repo
    shared = tmp_path / "shared"
    set_tune(
        repo,
        name="cluster",
        metric="monitor_knn_top1",
        num_samples=2,
        epochs=2,
        max_concurrent_trials=2,
        storage_path=shared.as_uri(),
        space=TINY_SWEEP["tune"]["space"],  # the killed sweep's searched the linear probe's
    )
    result = run(["python", "-m", "pipelines.tune"], repo, {**env, "RAY_ADDRESS": two_node_cluster})
    assert result.returncode == 0, result.output
    nodes = {reports[-1]["node_id"] for reports in trial_results(repo, "cluster", shared).values()}
    assert len(nodes) == 2, nodes


def test_an_unreachable_cluster_fails_fast_with_the_fix(sweep_repo):
    repo, env = sweep_repo
    result = run(["python", "-m", "pipelines.tune"], repo, {**env, "RAY_ADDRESS": "127.0.0.1:1"}, timeout=60)
    assert result.returncode == 2 and "RAY_ADDRESS=127.0.0.1:1 is unreachable" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_colorization_sweep_on_gray_images_stops_before_ray_starts(sweep_repo):
    repo, env = sweep_repo
    with changed_params(repo, {"method": {"name": "colorization"}}):
        result = run(["python", "-m", "pipelines.tune"], repo, {**env, "RAY_ADDRESS": "127.0.0.1:1"}, timeout=60)
    assert result.returncode == 2  # the data's error, not the unreachable cluster's: Ray was never reached
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: params.yaml: method.name=colorization predicts colour") and "is gray" in line


def test_a_sweep_whose_every_trial_fails_says_so_in_one_line_and_lists_the_errors(sweep_repo):
    repo, env = sweep_repo
    set_tune(
        repo,
        name="diverged",
        metric="monitor_knn_top1",
        num_samples=2,
        epochs=2,
        scheduler="fifo",
        storage_path=None,
        space={"train.lr": {"choice": [1.0e6]}},  # the loss becomes NaN in the first epoch
    )
    result = run(["python", "-m", "pipelines.tune"], repo, env)
    assert result.returncode == 2, result.output
    assert result.stderr.strip().splitlines()[-1].startswith("error: no trial reported monitor_knn_top1")
    rows = trials(repo)
    assert len(rows) == 2 and all("the loss became nan" in row["status"] for row in rows), rows
