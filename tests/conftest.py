"""Shared helpers: a private copy of the repository to run real `dvc repro` in, and a stage runner."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent

# Every Ray cluster the suite starts requires this token, as selfsup's own local instances do; stages and clients
# the tests start inherit it. Set before anything imports Ray (it reads RAY_AUTH_MODE on import).
os.environ["RAY_AUTH_MODE"] = "token"
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
# The suite's two processes share the 2 cores (see pytest_xdist_make_scheduler): each computes on one thread, and the
# threads of what they start wait for a core asleep. With OpenMP's default spinning, two processes of two threads
# each ran a test module 5.6 times slower than one alone; this way each runs at the speed of one alone.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
SHARED_CIFAR10 = ROOT.parent / "shared" / "datasets" / "cifar10"

# The suite runs in two processes (pytest-xdist, `-n 2` in pyproject.toml): while one waits on a stage, a Ray
# start-up or a server, the other computes. A test file runs whole in one process, so that its module fixtures are
# built once, and so do the files that share a session fixture running a pipeline or a cluster. (xdist's own
# `--dist loadgroup` ignores its marks under pytest 9.2: pytest-dev/pytest-xdist#1386.)
SHARED_SESSION_FIXTURE = {
    "tests/e2e/test_default_pipeline.py": "default_run",
    "tests/e2e/test_pipeline.py": "default_run",
    "tests/e2e/test_ray_cluster.py": "two_node_cluster",
    "tests/e2e/test_tune.py": "two_node_cluster",
}


@pytest.hookimpl(optionalhook=True)  # a hook of xdist's, absent under -p no:xdist
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    from xdist.scheduler import LoadScopeScheduling

    class ByFileAndSharedFixture(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return SHARED_SESSION_FIXTURE.get(path, path)

    return ByFileAndSharedFixture(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A file that starts using a shared session fixture must join its process, or that process builds it again."""
    for item in items:
        path = item.nodeid.split("::", 1)[0]
        for fixture in set(SHARED_SESSION_FIXTURE.values()) & set(getattr(item, "fixturenames", ())):
            if SHARED_SESSION_FIXTURE.get(path) != fixture:
                raise pytest.UsageError(f"{path} uses {fixture}: add it to SHARED_SESSION_FIXTURE in tests/conftest.py")


# Small enough for seconds per stage on 2 cores, big enough that every stage does real work.
TINY_PARAMS = {
    "train": {"epochs": 2, "batch_size": 128, "checkpoint_every": 1, "warmup_epochs": 0, "monitor_every": 1},
    "eval": {"seeds": [0, 1], "linear": {"epochs": 5}, "semisup": {"steps": 5}},
}


def stage_env(tmp: Path, repo: Path) -> dict[str, str]:
    """The environment stage commands run in: this venv first on PATH, the copy's own library first on
    PYTHONPATH (not the editable install's), private DVC state."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(repo / "ssl")
    env["DVC_SITE_CACHE_DIR"] = str(tmp / "dvc-site-cache")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def copy_repo(destination: Path) -> Path:
    """The working tree as git sees it (tracked + untracked, not ignored), committed in a new repo."""
    files = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, files):
        source = ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    for name in ("dvc.lock",):  # results of this checkout's own runs must not leak into the copy
        (destination / name).unlink(missing_ok=True)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]
    subprocess.run(["git", "init", "-q"], cwd=destination, check=True)
    subprocess.run(["git", "add", "-A"], cwd=destination, check=True)
    subprocess.run([*git, "commit", "-qm", "copy"], cwd=destination, check=True)
    return destination


def update_params(repo: Path, changes: dict) -> None:
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())

    def merge(into: dict, new: dict) -> None:
        for key, value in new.items():
            if isinstance(value, dict) and isinstance(into.get(key, {}), dict):
                merge(into.setdefault(key, {}), value)
            else:
                into[key] = value

    merge(params, changes)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def run(command: list[str], repo: Path, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    result.output = result.stdout + result.stderr  # type: ignore[attr-defined]
    return result


@pytest.fixture(scope="session")
def shared_ray_address(tmp_path_factory) -> Iterator[str]:
    """One Ray cluster for every pipeline test: a stage joins it through RAY_ADDRESS instead of starting a
    local instance of its own (about 6 s each). Its workers import the library from this working tree,
    which every test's copy equals."""
    env = stage_env(tmp_path_factory.mktemp("shared-ray"), ROOT)
    with ray_cluster(env, node_cpus=[os.cpu_count() or 2]) as address:
        yield address


@pytest.fixture(scope="session")
def two_node_cluster(tmp_path_factory) -> Iterator[str]:
    """A head and a worker node of one CPU each, on loopback: test_ray_cluster's pretraining and test_tune's
    trials share it (each start of a cluster costs about 15 s). Its workers import this working tree."""
    env = stage_env(tmp_path_factory.mktemp("two-node-ray"), ROOT)
    with ray_cluster(env, node_cpus=[1, 1]) as address:
        yield address


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory, shared_ray_address) -> tuple[Path, dict[str, str]]:
    """A private copy of the repo with tiny params, and the env to run its stages in (on the shared cluster)."""
    tmp = tmp_path_factory.mktemp("pipeline")
    repo = copy_repo(tmp / "repo")
    update_params(repo, TINY_PARAMS)
    return repo, {**stage_env(tmp, repo), "RAY_ADDRESS": shared_ray_address}


@contextmanager
def changed_params(repo: Path, params: dict) -> Iterator[None]:
    """params.yaml with `params` merged in (update_params), restored as it was on leaving."""
    before = (repo / "params.yaml").read_text()
    update_params(repo, params)
    try:
        yield
    finally:
        (repo / "params.yaml").write_text(before)


@dataclass(frozen=True)
class PipelineRun:
    """A `dvc repro` of a private copy of the repo: where, with which env, what it printed and the metrics it
    wrote, read at once (a later experiment in that copy rewrites the workspace's)."""

    repo: Path
    env: dict[str, str]
    output: str
    metrics: dict[str, dict]


@pytest.fixture(scope="session")
def default_run(tmp_path_factory) -> PipelineRun:
    """The shipped params, `dvc repro` once as the README runs it, on the private Ray instance the stage starts
    (about 1.5 minutes on 2 cores): test_default_pipeline checks what pretraining buys, test_pipeline the stages,
    the pictures, the registry and experiments on top."""
    tmp = tmp_path_factory.mktemp("default")
    repo = copy_repo(tmp / "repo")
    env = stage_env(tmp, repo)
    result = run(["dvc", "repro"], repo, env, timeout=900)
    assert result.returncode == 0, result.output
    metrics = {path.stem: json.loads(path.read_text()) for path in (repo / "metrics").glob("*.json")}
    return PipelineRun(repo, env, result.output, metrics)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_CLUSTER_TEMP_DIRS: dict[str, str] = {}  # address -> the temp dir of a cluster ray_cluster started


@contextmanager
def ray_cluster(env: dict[str, str], node_cpus: list[int]) -> Iterator[str]:
    """A real Ray cluster on this machine, one node per entry of node_cpus (the first is the head); yields the
    RAY_ADDRESS that reaches it, and stops exactly its own processes afterwards."""
    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Unix socket paths stop at 107 bytes
    address = f"127.0.0.1:{port}"
    _CLUSTER_TEMP_DIRS[address] = temp_dir
    dashboard_port = free_port()
    # Several Ray instances live on this host at once (two clusters, the stages' private ones): Ray Train's
    # placement-group cleaner must ask this cluster's own dashboard, which the workers learn from here.
    settings = {
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",  # the stages' own setting (ray_trainer)
        "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard_port}",
    }
    try:
        for i, cpus in enumerate(node_cpus):
            head = ["--head", f"--port={port}", "--disable-usage-stats", f"--dashboard-port={dashboard_port}"]
            where = head if i == 0 else [f"--address=127.0.0.1:{port}"]
            common = [f"--num-cpus={cpus}", "--object-store-memory=100000000", f"--temp-dir={temp_dir}"]
            subprocess.run(
                ["ray", "start", *where, *common],
                env={**env, **settings},
                check=True,
                capture_output=True,
                timeout=120,
            )
        yield address
    finally:
        _stop_ray_cluster(address)


def ray_cluster_processes(address: str) -> set[psutil.Process]:
    """The processes of the cluster `ray_cluster` started at `address`: those whose command line names its own
    temp dir (GCS, raylets, dashboard and agents), and everything below them (the raylets' workers, whose
    command lines Ray rewrites). Never another Ray on the host, whatever its port."""
    temp_dir = _CLUSTER_TEMP_DIRS[address]
    ours = [p for p in psutil.process_iter(["cmdline"]) if any(temp_dir in arg for arg in p.info["cmdline"] or [])]
    processes = set()
    for root in ours:
        try:
            processes |= {root, *root.children(recursive=True)}
        except psutil.NoSuchProcess:
            pass
    return processes


def _stop_ray_cluster(address: str) -> None:
    """Stop only this cluster's processes (`ray stop` would end every Ray instance on the host)."""
    processes = ray_cluster_processes(address)
    for process in processes:
        process.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(list(processes), timeout=3)
    for process in alive:  # raylet and GCS may ignore SIGTERM for a while
        process.kill()


@pytest.fixture
def one_thread():
    """Tiny tensors: threads only add overhead on the 2 shared cores. Restored after, for the other tests."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def method_inputs(name: str, count: int, num_classes: int = 10) -> dict:
    """What the loop passes a method besides its views, for a batch of `count` images: the labels to a method
    that trains on them (the supervised reference), the images' indices to Exemplar-CNN; else nothing."""
    import torch

    from selfsup.methods import METHODS

    inputs = {}
    if METHODS[name].uses_labels:
        inputs["labels"] = torch.arange(count) % num_classes
    if METHODS[name].uses_indices:
        inputs["indices"] = torch.arange(count)
    return inputs


TEST_IMAGES = 64  # the training set Exemplar-CNN's classes are sized for in the step-level tests
