"""Online embedding: `pipelines.serve` (Ray Serve, requests batched) against `mlflow models serve` (one process, a
request at a time) on the same registered model and images: latency p50/p99 and requests/s at concurrency 1, 8
and 32, side by side in one run, on CPU.

The model is an encoder registered for the purpose (random weights) in a temporary MLflow store; the images are
CIFAR-10 test JPEGs from ../shared (or random 32 px PNGs). Each request embeds one image: to Ray Serve the file's
bytes, to MLflow's server the documented JSON (`{"inputs": [H x W x 3 list]}`). Each level runs --seconds after
a warm-up; both servers run one replica (one worker process) so that batching is what differs.

    python benchmarks/serve_latency.py                      # ResNet-18 at 32 px, 20 s a level (~3 min on 2 cores)
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "ssl"))  # a plain checkout works without `pip install`

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402

import numpy as np  # noqa: E402
from embed_speed import register_random_encoder  # noqa: E402
from prepare_speed import small_files  # noqa: E402

CONCURRENCY = (1, 8, 32)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20.0)
    return parser.parse_args()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited: {process.stdout.read()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"no answer from {url} within {timeout:.0f} s")


def load(url: str, bodies: list[bytes], headers: dict, concurrency: int, seconds: float) -> dict:
    """`concurrency` clients posting without pause for `seconds`: latency percentiles and requests/s."""
    latencies, failures, stop = [], [], threading.Event()

    def client(offset: int) -> None:
        n = offset
        while not stop.is_set():
            request = urllib.request.Request(url, data=bodies[n % len(bodies)], headers=headers, method="POST")
            started = time.perf_counter()
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    response.read()
                latencies.append(time.perf_counter() - started)
            except OSError as error:
                failures.append(str(error))
            n += concurrency

    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {
        "p50_ms": float(np.percentile(ms, 50)) if len(ms) else float("nan"),
        "p99_ms": float(np.percentile(ms, 99)) if len(ms) else float("nan"),
        "requests_per_s": len(latencies) / elapsed,
        "failed": len(failures),
        "first_failure": failures[0] if failures else None,
    }


def main() -> None:
    args = parse_args()
    from selfsup.data.sources import read_image

    with tempfile.TemporaryDirectory(prefix="serve-latency-") as tmp:
        root = Path(tmp)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        uri = register_random_encoder(root, args.backbone, args.image_size)
        files = small_files(256, root / "images")
        jpegs = [Path(f).read_bytes() for f in files]
        as_json = [json.dumps({"inputs": [read_image(f).tolist()]}).encode() for f in files]
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env |= {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "PYTHONPATH": str(REPO / "ssl")}
        ours_port, mlflow_port = free_port(), free_port()
        servers = {
            "pipelines.serve (Ray Serve)": (
                [sys.executable, "-m", "pipelines.serve", "--model", uri, "--port", str(ours_port)],
                f"http://127.0.0.1:{ours_port}",
                "/embed",
                jpegs,
                {},
            ),
            "mlflow models serve": (
                [
                    "mlflow",
                    "models",
                    "serve",
                    "-m",
                    uri,
                    "--env-manager",
                    "local",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(mlflow_port),
                    "-w",
                    "1",
                ],
                f"http://127.0.0.1:{mlflow_port}",
                "/invocations",
                as_json,
                {"Content-Type": "application/json"},
            ),
        }
        rows = []
        for name, (command, url, route, bodies, headers) in servers.items():
            process = subprocess.Popen(
                command,
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
            try:
                wait_until_up(url + ("/health" if route == "/embed" else "/ping"), process)
                load(url + route, bodies, headers, 4, 3.0)  # warm-up
                for concurrency in CONCURRENCY:
                    result = load(url + route, bodies, headers, concurrency, args.seconds)
                    rows.append((name, concurrency, result))
                    print(name, concurrency, json.dumps(result), flush=True)
            finally:
                os.killpg(process.pid, signal.SIGINT)
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
    print(f"\n{args.backbone} at {args.image_size} px, one image a request, {os.cpu_count()} CPU cores\n")
    print("| server | concurrency | p50 (ms) | p99 (ms) | requests/s | failed |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, concurrency, r in rows:
        print(
            f"| {name} | {concurrency} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['requests_per_s']:.1f} | "
            f"{r['failed']} |"
        )


if __name__ == "__main__":
    main()
