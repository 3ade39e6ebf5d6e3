"""`python -m pipelines.serve`: real HTTP against the Ray Serve application the test starts. Embeddings equal the
registered model's predict, neighbours come from the index, a bad upload is a 400, and when the champion alias
moves the service switches to the new version with no failed request, refusing the old version's index."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import pytest

from selfsup.embedding import _claim_output, _write_shard
from selfsup.search import EmbeddingIndex
from selfsup.tracking import ModelVersionRef
from tests.conftest import ROOT, free_port
from tests.e2e.test_embed import photo_folder
from tests.unit.test_serving import register

pytestmark = pytest.mark.slow


def post(url: str, body: bytes, timeout: float = 30) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def index_of(images: dict[str, np.ndarray], model, ref: ModelVersionRef, folder: Path) -> Path:
    """The images' embeddings by `model`, as `pipelines.embed` writes them, indexed as `pipelines.search` does."""
    paths = sorted(images)
    embeddings = model.predict([images[path] for path in paths])
    manifest = {
        "model": ref.name,
        "version": ref.version,
        "listing_sha256": "x",
        "count": len(paths),
        "images_per_shard": len(paths),
        "files": ["embeddings-00000.parquet"],
    }
    _claim_output(folder / "embeddings", manifest)
    _write_shard(folder / "embeddings", 0, paths, [(i, e, "") for i, e in enumerate(embeddings)], ref)
    EmbeddingIndex.build(folder / "embeddings").save(folder / "index")
    return folder / "index"


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """Version 1 @champion, an index of 12 images by it, and the service following the alias (polled every 0.3 s) on
    a private Ray instance of its own; stopped with Ctrl-C as a user would."""
    import mlflow

    root = tmp_path_factory.mktemp("served")
    register(root)  # into root's own store, whatever MLFLOW_TRACKING_URI says
    tracking = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(tracking)
    model = mlflow.pyfunc.load_model("models:/test-encoder/1")
    images = photo_folder(root / "photos", 12)
    index = index_of(images, model, ModelVersionRef("test-encoder", "1"), root)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
        "MLFLOW_TRACKING_URI": tracking,
        "PYTHONPATH": str(ROOT / "ssl"),
        "PYTHONUNBUFFERED": "1",
    }
    command = [
        sys.executable,
        "-m",
        "pipelines.serve",
        "--model",
        "models:/test-encoder@champion",
        "--index",
        str(index),
        "--port",
        str(port),
        "--poll-s",
        "0.3",
        "--max-batch-size",
        "8",
    ]
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    said = []
    threading.Thread(target=lambda: said.extend(process.stdout), daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
        assert process.poll() is None, "".join(said)
    else:
        pytest.fail("the service did not answer within 120 s:\n" + "".join(said)[-3000:])
    yield {"url": url, "port": port, "root": root, "images": images, "model": model, "process": process, "said": said}
    process.send_signal(signal.SIGINT)
    try:  # it usually exits in 3 s; in one suite run Ray's shutdown took over 30 s (not yet understood)
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def png(pixels: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_embeddings_and_neighbours_are_right_and_only_loopback_listens(service) -> None:
    images, model = service["images"], service["model"]
    path = sorted(images)[4]
    status, answer = post(f"{service['url']}/embed", png(images[path]))
    assert status == 200 and (answer["model"], answer["version"]) == ("test-encoder", "1"), answer
    np.testing.assert_allclose(answer["embedding"], model.predict([images[path]])[0], rtol=1e-5, atol=1e-5)
    status, answer = post(f"{service['url']}/neighbours?k=3", png(images[path]))
    assert status == 200 and len(answer["neighbours"]) == 3, answer
    assert answer["neighbours"][0]["path"] == path and answer["neighbours"][0]["score"] > 0.9999
    listening = [
        c.laddr for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == service["port"]
    ]
    assert listening and {address.ip for address in listening} == {"127.0.0.1"}, listening


def test_a_bad_upload_is_a_400_that_says_what_to_send(service) -> None:
    status, answer = post(f"{service['url']}/embed", b"these bytes are no image")
    assert status == 400 and "not an image this service can read" in answer["error"], answer
    status, answer = post(f"{service['url']}/embed", b"")
    assert status == 400 and "empty request: POST an image file's bytes" in answer["error"], answer
    status, answer = post(f"{service['url']}/neighbours?k=0", png(np.zeros((8, 8, 3), np.uint8)))
    assert status == 400 and "ask for 1 to 1000 neighbours" in answer["error"], answer


def test_moving_the_alias_switches_the_version_with_no_failed_request(service) -> None:
    """Clients post without pause while version 2 (other weights) becomes the champion: every request succeeds,
    each answer is version 1 until the switch and version 2 after it, within seconds; the index, made by version 1,
    is then refused with a 409 rather than searched with version 2's embeddings."""
    from mlflow import MlflowClient

    body = png(service["images"][sorted(service["images"])[0]])
    answers, stop = [], threading.Event()

    def client() -> None:
        while not stop.is_set():
            sent = time.monotonic()
            status, answer = post(f"{service['url']}/embed", body)
            answers.append((sent, time.monotonic(), status, answer.get("version"), answer.get("embedding")))

    clients = [threading.Thread(target=client) for _ in range(4)]
    for thread in clients:
        thread.start()
    time.sleep(1.0)
    register(service["root"], seed=1)  # into root's own store, whatever MLFLOW_TRACKING_URI says
    MlflowClient(f"sqlite:///{service['root'] / 'mlflow.db'}").set_registered_model_alias(
        "test-encoder", "champion", "2"
    )
    moved = time.monotonic()
    deadline = moved + 30
    while time.monotonic() < deadline and not any(answer[3] == "2" for answer in answers[-4:]):
        time.sleep(0.1)
    time.sleep(1.0)
    stop.set()
    for thread in clients:
        thread.join()
    assert answers and all(status == 200 for _, _, status, _, _ in answers), [a[:4] for a in answers if a[2] != 200]
    switched = min(received for _, received, _, version, _ in answers if version == "2")  # raises if it never did
    assert switched - moved < 15, switched - moved
    print(f"version 2 answered {switched - moved:.2f} s after the alias moved; {len(answers)} requests, none failed")
    assert all(version == "1" for _, received, _, version, _ in answers if received < moved)
    assert all(version == "2" for sent, _, _, version, _ in answers if sent > switched)  # once switched, stays
    assert not np.allclose(answers[0][4], answers[-1][4])  # version 2, other weights, really answered
    status, answer = post(f"{service['url']}/neighbours", body)
    assert status == 409 and "holds embeddings of test-encoder version 1" in answer["error"], answer
