"""Joining a Ray cluster, or starting a private local instance: what every stage that runs Ray does first (prepare's
shard writing, pretraining, sweeps)."""

from __future__ import annotations

import os
import secrets
import socket

import ray

from selfsup.errors import RayClusterError
from selfsup.reachability import unreachable

# Ray Data's scheduling loop (2.60) does not block while it waits for a slower consumer: once its tasks are done, or
# their output waits unread under backpressure, each step returns at once and the loop spins a whole core. Training
# streams through such a loop (in Ray Train's SplitCoordinator actor) for as long as the data is ahead of it, which
# is the goal: on 2 cores it halved the training (850 against 1,800 images/s, docs/streaming.md); `prepare` and
# `embed` iterate one in their own process. A floor on a step's duration turns the spin into a poll of 200 steps a
# second, plenty for blocks of thousands of images.
SCHEDULER_STEP_FLOOR_S = 0.005
# The processes of a streaming job apply it as they start (ray.init's worker_process_setup_hook).
THROTTLE_HOOK = "selfsup.ray_cluster.throttle_ray_data_scheduler"

# Quiet defaults for the processes Ray starts from here; a user's own settings win.
QUIET_RAY = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    # The controller polls its workers this often (Ray's default: 2 s), and each `report` and the end of
    # `fit()` wait for that poll: 0.2 s (what Ray's own tests use) saves seconds per run for a few tiny tasks.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "RAY_DATA_LOG_LEVEL": "WARNING",  # streaming: Ray Data's line per pass would interleave with the epochs'
}


def connect_ray(dashboard: bool = False, streaming: bool = False) -> None:
    """Join the cluster at RAY_ADDRESS if set (failing fast when it is unreachable or refuses us), else start a
    private local instance that never joins another by accident. Environment variables are set here, where Ray
    starts (its processes inherit them), never at import. `streaming`: this job's processes throttle Ray Data's
    scheduling loop as they start (throttle_ray_data_scheduler below; it costs each process the
    import of Ray Data, half a second, so only streaming runs ask for it)."""
    if ray.is_initialized():
        return
    for key, value in QUIET_RAY.items():
        os.environ.setdefault(key, value)
    runtime_env = {"worker_process_setup_hook": THROTTLE_HOOK} if streaming else None
    address = os.environ.get("RAY_ADDRESS")
    if address:
        _check_reachable(address)
        try:
            ray.init(address=address, log_to_driver=True, runtime_env=runtime_env)
        except ConnectionError as error:
            raise RayClusterError(_refused(address, error)) from None
        return
    start_private_instance(dashboard, runtime_env)


def start_private_instance(dashboard: bool = False, runtime_env: dict | None = None) -> str:
    """A local Ray instance of this machine's CPUs that only holders of its token can use, and return the
    dashboard's URL (empty without one).

    Ray binds its GCS, raylet and workers to every interface, so the token is the lock: a fresh one per process
    (RAY_AUTH_TOKEN, inherited by the instance's processes only), never written to disk. `address="local"`
    starts a new instance even when `ray start` left one on the machine."""
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))  # one per process: Ray caches the first it reads
    # Ray read RAY_AUTH_MODE when it was imported; re-read it as ray.init does when it turns token auth on itself.
    from ray._raylet import Config

    Config.initialize("")
    # Ray Train's placement-group cleaner asks "the" dashboard whether the run's controller is alive; unpointed, it
    # may find another Ray instance's dashboard on this host, which does not know the controller, and remove a live
    # run's workers. Point it at our own (or, without one, at a port nothing serves: it then keeps the workers).
    port = _free_loopback_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    ray.init(
        address="local",
        num_cpus=os.cpu_count(),
        object_store_memory=256 << 20,  # else each node claims 30% of RAM
        include_dashboard=dashboard,
        dashboard_host="127.0.0.1",
        dashboard_port=port,
        # The cleaner, without a dashboard to ask, warns every few seconds that it cannot; errors still show.
        logging_config=ray.LoggingConfig(log_level="ERROR"),
        runtime_env=runtime_env,
    )
    return os.environ["RAY_API_SERVER_ADDRESS"] if dashboard else ""


def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _refused(address: str, error: ConnectionError) -> str:
    cause = f"{error} {error.__cause__ or ''}"
    if "uthenticat" in cause or "token" in cause:
        return (
            f"the Ray cluster at RAY_ADDRESS={address} refused this client's token: set RAY_AUTH_MODE=token and the "
            "cluster's token (`ray get-auth-token` on its head) in RAY_AUTH_TOKEN or ~/.ray/auth_token"
        )
    return f"could not join the Ray cluster at RAY_ADDRESS={address} ({str(error).splitlines()[0]})"


def _check_reachable(address: str) -> None:
    if address == "auto":
        return
    problem = unreachable(address, default_port=10001 if address.startswith("ray://") else 6379)
    if problem:
        raise RayClusterError(
            f"the Ray cluster at RAY_ADDRESS={address} is unreachable ({problem}): start it "
            "(`ray start --head`), fix the address, or unset RAY_ADDRESS to run on a local instance"
        ) from None


def quiet_ordered_ray_data():
    """This process's Ray Data context, set before a Dataset is made (it copies it): results in the order of the
    input (what the seed or the listing gives, not the order tasks finish in), and no progress bars, execution
    logs or stats, which would bury selfsup's own lines."""
    import logging

    import ray.data

    throttle_ray_data_scheduler()  # this process runs the loop when it iterates a Dataset itself
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.op_resource_reservation_enabled = True  # Ray Data's default, which a caller may have turned off
    context.enable_progress_bars = context.print_on_execution_start = context.enable_auto_log_stats = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # "progress bars disabled", "execution finished in"
    return context


def throttle_ray_data_scheduler() -> None:
    """Give each step of Ray Data's scheduling loop at least SCHEDULER_STEP_FLOOR_S in this process."""
    import time

    from ray.data._internal.execution.streaming_executor import StreamingExecutor

    step = getattr(StreamingExecutor, "_scheduling_loop_step", None)
    if step is None or getattr(step, "throttled", False):  # another Ray version, or done already
        return

    def throttled_step(self, topology):
        started = time.perf_counter()
        go_on = step(self, topology)
        rest = SCHEDULER_STEP_FLOOR_S - (time.perf_counter() - started)
        if rest > 0 and go_on:
            time.sleep(rest)
        return go_on

    throttled_step.throttled = True
    StreamingExecutor._scheduling_loop_step = throttled_step
