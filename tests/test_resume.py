"""An interrupted `pretrain` stage resumes from its latest checkpoint: its Ray Train worker killed, Ray restarts
the worker and the same run completes; with no restarts left, the stage stops with one line and the next run
resumes. (A killed driver leaves the same checkpoint behind: the next run's resume is the same code.)"""

from __future__ import annotations

import json
import re
import subprocess
import time

import psutil
import pytest

from tests.conftest import run, update_params

pytestmark = pytest.mark.slow
RAY_FORWARDED = re.compile(r"^(\x1b\[[0-9;]*m)?\(\w+ pid=\d+")  # a log line Ray forwards from an actor


def _ray_train_workers() -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"]) if any("RayTrainWorker" in a for a in p.info["cmdline"] or [])]


def _pretrain_with_a_worker_killed(repo, env) -> tuple[int, str, str]:
    """Run the pretrain stage and SIGKILL its Ray Train worker once the first checkpoint is written."""
    assert run(["dvc", "repro", "prepare"], repo, env).returncode == 0
    for folder in (repo / "checkpoints").glob("*/"):  # an earlier test's, of the same params
        subprocess.run(["rm", "-rf", str(folder)], check=True)
    stage = subprocess.Popen(
        ["python", "-m", "pipelines.pretrain"],
        cwd=repo,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline, killed = time.monotonic() + 180, []
    while time.monotonic() < deadline and not killed:
        if list((repo / "checkpoints").glob("*/checkpoint_*")):
            time.sleep(0.5)  # the worker is into the next epoch
            killed = _ray_train_workers()
            for worker in killed:
                worker.kill()
        time.sleep(0.2)
    output, errors = stage.communicate(timeout=300)
    assert killed, "no checkpoint within the deadline"
    return stage.returncode, output + errors, errors


def test_a_killed_worker_is_restarted_from_the_latest_checkpoint_and_the_stage_completes(tiny_repo):
    repo, env = tiny_repo
    update_params(repo, {"train": {"epochs": 6, "checkpoint_every": 1}, "scaling": {"max_failures": 2}})
    returncode, output, _ = _pretrain_with_a_worker_killed(repo, env)
    assert returncode == 0, output
    epochs = [int(line.split(",")[0]) for line in (repo / "plots" / "pretrain.csv").read_text().splitlines()[1:]]
    assert epochs == [1, 2, 3, 4, 5, 6]  # every epoch once: no gap, no repeat
    assert "resuming from the checkpoint of epoch" in output


def test_when_restarts_run_out_one_line_names_the_kept_checkpoint(tiny_repo):
    repo, env = tiny_repo
    update_params(repo, {"train": {"epochs": 6, "checkpoint_every": 1}, "scaling": {"max_failures": 0}})
    returncode, _, errors = _pretrain_with_a_worker_killed(repo, env)
    assert returncode == 2
    ours = [line for line in errors.strip().splitlines() if line.startswith("error:")]
    assert len(ours) == 1, errors
    last = ours[0]
    assert last.startswith("error: a Ray Train worker failed 1 time(s), past scaling.max_failures=0"), errors
    assert "the latest checkpoint is kept in " in last and "`dvc repro` resumes from it" in last
    # Ray forwards its own actors' logs, prefixed "(ActorName pid=N)": once, its PlacementGroupCleaner printed a
    # teardown traceback there, after our line. What the stage itself prints has none.
    own = [line for line in errors.splitlines() if not RAY_FORWARDED.match(line)]
    assert not any("Traceback" in line for line in own), errors
    # The next run resumes from the kept checkpoint and ends with the whole history.
    resumed = run(["python", "-m", "pipelines.pretrain"], repo, env)
    assert resumed.returncode == 0 and "resuming from the checkpoint of epoch" in resumed.output, resumed.output
    first_epoch_run = int(resumed.output.split("resuming from the checkpoint of epoch ")[1].split("/")[0]) + 1
    assert f"epoch {1:>3}/6" not in resumed.output and f"epoch {first_epoch_run:>3}/6" in resumed.output
    assert json.loads((repo / "metrics" / "pretrain.json").read_text())["epochs"] == 6
    assert len((repo / "plots" / "pretrain.csv").read_text().splitlines()) == 7
    assert [p.name for p in (repo / "checkpoints").iterdir()] == ["README"]  # a finished run cleans up
