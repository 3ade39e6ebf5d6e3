"""An interrupted `pretrain` stage resumes from its latest checkpoint: its Ray Train worker killed, Ray restarts
the worker and the run goes on; with no restarts left, the stage stops with one line and the next run resumes
and completes. (A killed driver leaves the same checkpoint behind: the next run's resume is the same code.)

The images are streamed (a folder of unlabelled images written as shards that Ray Data reads): the restarted
worker takes its part of the stream again, from the epoch after the checkpoint. Images in memory resume through
the same loop (tests/unit/train/test_loop.py checks that resumed run bit for bit).

One test covers both, since each start of the stage and each kill cost seconds: the worker is killed once
(restarted, scaling.max_failures=1), then again (restarts run out), then the stage is run once more."""

from __future__ import annotations

import json
import re
import subprocess
import time

import psutil
import pytest

from tests.conftest import ray_cluster_processes, run, update_params

pytestmark = pytest.mark.slow
EPOCHS = 6  # a kill after the first checkpoint, one after the restarted worker's first, and epochs left to resume
RAY_FORWARDED = re.compile(r"^(\x1b\[[0-9;]*m)?\(\w+ pid=\d+")  # a log line Ray forwards from an actor


def _ray_train_workers(address: str) -> list[psutil.Process]:
    """The Ray Train workers of the cluster this test session started (`address`): no other Ray on the host."""
    workers = []
    for process in ray_cluster_processes(address):
        try:
            if any("RayTrainWorker" in part for part in process.cmdline()):
                workers.append(process)
        except psutil.NoSuchProcess:
            pass
    return workers


def _checkpoints(repo) -> set[str]:
    return {path.name for path in (repo / "checkpoints").glob("*/checkpoint_*")}


def _kill_a_new_worker_after_its_first_checkpoint(
    address: str, repo, deadline: float, killed: tuple[int, ...] = ()
) -> tuple:
    """Wait for a Ray Train worker on the test's cluster (`address`) not in `killed`, then for a checkpoint it
    wrote; SIGKILL it; its pids."""
    while not (workers := [w for w in _ray_train_workers(address) if w.pid not in killed]):
        assert time.monotonic() < deadline, "no new Ray Train worker within the deadline"
        time.sleep(0.1)
    before = _checkpoints(repo)
    while not _checkpoints(repo) - before:
        assert time.monotonic() < deadline, "no new checkpoint within the deadline"
        time.sleep(0.1)
    time.sleep(0.5)  # the checkpoint is reported to Ray Train, and the worker is into the next epoch
    for worker in workers:
        worker.kill()
    return tuple(worker.pid for worker in workers)


def test_a_killed_worker_is_restarted_and_when_restarts_run_out_the_next_run_resumes(tiny_repo):
    from tests.e2e.test_pipeline import unlabelled_folder

    repo, env = tiny_repo
    photos = unlabelled_folder(repo.parent / "photos", count=360)  # 324 to train on: 4 shards of 100
    streamed = {"source": "folder", "root": str(photos), "streaming": True, "images_per_shard": 100}
    update_params(
        repo,
        {
            "data": streamed,
            "train": {"epochs": EPOCHS, "checkpoint_every": 1},
            "scaling": {"max_failures": 1},
            "mlflow": {"champion_metric": "rankme"},  # no labels: the monitor measures RankMe alone
        },
    )
    assert run(["dvc", "repro", "prepare"], repo, env).returncode == 0
    assert len(json.loads((repo / "data" / "prepared" / "manifest.json").read_text())["splits"]["train"]["files"]) == 4
    for folder in (repo / "checkpoints").glob("*/"):  # an earlier test's, of the same params
        subprocess.run(["rm", "-rf", str(folder)], check=True)
    other = repo / "checkpoints" / "simclr-0123456789ab" / "checkpoint_000000"  # another configuration's
    other.mkdir(parents=True)
    stage = subprocess.Popen(
        ["python", "-m", "pipelines.pretrain"],
        cwd=repo,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    first = _kill_a_new_worker_after_its_first_checkpoint(env["RAY_ADDRESS"], repo, deadline)
    # the worker Ray restarted
    _kill_a_new_worker_after_its_first_checkpoint(env["RAY_ADDRESS"], repo, deadline, killed=first)
    output, errors = stage.communicate(timeout=300)
    assert "resuming from the checkpoint of epoch" in output + errors  # ... which resumed, not started afresh

    assert stage.returncode == 2, output + errors
    ours = [line for line in errors.strip().splitlines() if line.startswith("error:")]
    assert len(ours) == 1, errors
    assert ours[0].startswith("error: a Ray Train worker failed 2 time(s), past scaling.max_failures=1"), errors
    assert "the latest checkpoint is kept in " in ours[0] and "`dvc repro` resumes from it" in ours[0]
    # Ray forwards its own actors' logs, prefixed "(ActorName pid=N)": once, its PlacementGroupCleaner printed a
    # teardown traceback there, after our line. What the stage itself prints has none.
    own = [line for line in errors.splitlines() if not RAY_FORWARDED.match(line)]
    assert not any("Traceback" in line for line in own), errors

    assert other.is_dir()  # removed only once a run succeeds
    # An edit of code the stage does not run keeps the checkpoints resumable.
    with open(repo / "ssl" / "selfsup" / "serving.py", "a") as f:
        f.write("\n# edited while the run was interrupted\n")
    # The next run resumes from the kept checkpoint and ends with every epoch once: no gap, no repeat.
    resumed = run(["python", "-m", "pipelines.pretrain"], repo, env)
    assert resumed.returncode == 0 and "resuming from the checkpoint of epoch" in resumed.output, resumed.output
    first_epoch_run = int(resumed.output.split("resuming from the checkpoint of epoch ")[1].split("/")[0]) + 1
    assert f"epoch {1:>3}/{EPOCHS}" not in resumed.output and f"epoch {first_epoch_run:>3}/{EPOCHS}" in resumed.output
    assert json.loads((repo / "metrics" / "pretrain.json").read_text())["epochs"] == EPOCHS
    epochs = [int(line.split(",")[0]) for line in (repo / "plots" / "pretrain.csv").read_text().splitlines()[1:]]
    assert epochs == list(range(1, EPOCHS + 1))
    assert [p.name for p in (repo / "checkpoints").iterdir()] == ["README"]  # a finished run cleans up, others too
