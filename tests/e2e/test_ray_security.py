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
SUBMIT = """
from ray.job_submission import JobSubmissionClient
client = JobSubmissionClient('{url}', headers={headers})
print('submitted', client.submit_job(entrypoint='echo anyone can run code here'))
"""
LIST = """
from ray.job_submission import JobSubmissionClient
print('jobs', JobSubmissionClient('{url}', headers={headers}).list_jobs())
"""


def _client(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


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
        stranger = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"} | {"HOME": str(tmp_path)}  # no token file
        refused = _client(JOIN.format(address=gcs_address), stranger)
        assert refused.returncode != 0 and "joined" not in refused.stdout
        assert "Authentication token is missing or incorrect" in refused.stderr, refused.stderr[-2000:]
        wrong = {**stranger, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}
        assert "joined" not in _client(JOIN.format(address=gcs_address), wrong).stdout
        no_job = _client(SUBMIT.format(url=dashboard, headers=None), stranger)
        assert no_job.returncode != 0 and "submitted" not in no_job.stdout, no_job.stdout + no_job.stderr[-2000:]
        assert "401" in no_job.stderr or "nauthori" in no_job.stderr, no_job.stderr[-2000:]

        # The other side of the lock: the instance's token admits (the refusals are the token's doing).
        holder = {**env, "RAY_AUTH_MODE": "token", "HOME": str(tmp_path)}
        joined = _client(JOIN.format(address=gcs_address), holder)
        assert joined.returncode == 0 and "joined" in joined.stdout, joined.stderr[-2000:]
        token = {"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"}
        listed = _client(LIST.format(url=dashboard, headers=token), holder)
        assert listed.returncode == 0 and "jobs" in listed.stdout, listed.stderr[-2000:]
    finally:
        instance.stdin.close()
        instance.wait(timeout=60)
