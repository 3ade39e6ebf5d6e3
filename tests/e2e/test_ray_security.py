"""The Ray instance selfsup starts is private: it never joins a cluster left on the machine, and it refuses every
client, and every job submission, that lacks its token (Ray binds its GCS to every interface)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

PRIVATE_INSTANCE = """
import os, sys, ray
from selfsup.train.ray_trainer import connect_ray
connect_ray(dashboard=True)
print(ray.get_runtime_context().gcs_address, os.environ["RAY_API_SERVER_ADDRESS"], flush=True)
sys.stdin.read()  # serve until the test closes stdin
"""

JOIN = "import ray; ray.init(address='{address}'); print('joined', ray.cluster_resources()['CPU'])"
# A stranger (no token) tries both doors in one process: joining the cluster, then submitting a job.
STRANGER = """
import ray
try:
    ray.init(address='{address}')
    print('joined')
except Exception as error:
    print('refused:', ' '.join(str(error).split())[:500])
from ray.job_submission import JobSubmissionClient
try:
    print('submitted', JobSubmissionClient('{url}').submit_job(entrypoint='echo anyone can run code here'))
except Exception as error:
    print('no job:', ' '.join(str(error).split())[:500])
"""
HOLDER = (
    JOIN
    + """
from ray.job_submission import JobSubmissionClient
print('jobs', JobSubmissionClient('{url}', headers={headers}).list_jobs())
"""
)


def _clients(*clients: tuple[str, dict[str, str]]) -> list[subprocess.CompletedProcess]:
    """Run each (code, env) in its own Python, all at once (each Python and Ray start-up costs seconds)."""
    started = [
        (
            code,
            subprocess.Popen(
                [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            ),
        )
        for code, env in clients
    ]
    done = []
    for code, process in started:
        stdout, stderr = process.communicate(timeout=120)
        done.append(subprocess.CompletedProcess(code, process.returncode, stdout, stderr))
    return done


def test_the_local_instance_is_private_and_admits_only_its_token_holders(tmp_path, shared_ray_address):
    # A cluster left by `ray start` is on this machine (the suite's), and RAY_ADDRESS is unset: the stage must
    # start an instance of its own, not join that one.
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env["PYTHONPATH"] = str(ROOT / "ssl")
    instance = subprocess.Popen(
        [sys.executable, "-c", PRIVATE_INSTANCE],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        gcs_address, dashboard = instance.stdout.readline().split()
        assert gcs_address.rsplit(":", 1)[1] != shared_ray_address.rsplit(":", 1)[1]
        assert dashboard.startswith("http://127.0.0.1:")
        # No token, and no token file; a refused client retries its read of the GCS 20 times, 2 s apart: twice will do.
        stranger = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"} | {
            "HOME": str(tmp_path),
            "RAY_NUM_REDIS_GET_RETRIES": "2",
        }
        wrong = {**stranger, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}
        refused, guessed = _clients(
            (STRANGER.format(address=gcs_address, url=dashboard), stranger), (JOIN.format(address=gcs_address), wrong)
        )
        said = refused.stdout + refused.stderr
        assert "joined" not in refused.stdout and "submitted" not in refused.stdout, said[-3000:]
        assert "refused:" in refused.stdout and "Authentication token is missing or incorrect" in said, said[-3000:]
        assert "no job:" in refused.stdout and ("401" in said or "nauthori" in said), said[-3000:]
        assert "joined" not in guessed.stdout and "Authentication token is missing or incorrect" in guessed.stderr

        # The other side of the lock: the instance's token admits (the refusals are the token's doing).
        holder = {**env, "RAY_AUTH_MODE": "token", "HOME": str(tmp_path)}
        token = {"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"}
        (admitted,) = _clients((HOLDER.format(address=gcs_address, url=dashboard, headers=token), holder))
        assert admitted.returncode == 0, admitted.stderr[-2000:]
        assert "joined" in admitted.stdout and "jobs" in admitted.stdout, admitted.stdout
    finally:
        instance.stdin.close()
        instance.wait(timeout=60)
