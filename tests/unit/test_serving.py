"""The registered encoder as users call it: what it accepts (in process and over HTTP), and that its recorded pip
requirements are enough to load it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from selfsup.config import MlflowConfig, ModelConfig
from selfsup.data.sources import center_crop_resize_images as resize_square
from selfsup.models import Encoder, save_encoder
from selfsup.serving import InputError, as_images
from tests.conftest import free_port

SIZE = [16, 16]
RNG = np.random.default_rng(0)
IMAGES = RNG.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
OTHER = RNG.integers(0, 256, (20, 24, 3), dtype=np.uint8)  # another size: center-cropped and resized


def register(root: Path, backbone: str = "small_cnn", name: str = "test-encoder", seed: int = 0) -> str:
    """An encoder registered as the pipeline registers it (local SQLite store in `root`); returns its models:/ URI."""
    torch.manual_seed(seed)
    encoder = Encoder(ModelConfig(backbone=backbone, width=0.25), mean=[0.5] * 3, std=[0.25] * 3, image_size=16)
    save_encoder(encoder, root / "encoder.pt", SIZE)
    # root's own store: mlflow.set_tracking_uri elsewhere in the session sets MLFLOW_TRACKING_URI, which would win
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        _register(root, encoder, name)
    return f"models:/{name}@champion"


def _register(root: Path, encoder, name: str) -> None:
    from selfsup.tracking import register_encoder

    register_encoder(
        root / "encoder.pt",
        MlflowConfig(model_name=name),
        root,
        params={"train": {"lr": 0.1}},
        metrics={"knn_top1": 0.5},
        champion_metric="knn_top1",
        lineage={"git_commit": "abc", "dataset_sha256": "0" * 64},
        example=IMAGES,
        feature_dim=encoder.feature_dim,
    )


# -- what predict accepts ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "given, expected",
    [
        (IMAGES, IMAGES),
        (IMAGES[0], IMAGES[:1]),  # one image
        (IMAGES / 255.0, IMAGES),  # floats in [0, 1]
        ((IMAGES / 255.0).astype(np.float32), IMAGES),
        (IMAGES.astype(np.int64), IMAGES),  # what JSON numbers become
        (IMAGES.tolist(), IMAGES),
        (IMAGES[..., 0], np.repeat(IMAGES[..., :1], 3, axis=-1)),  # gray N x H x W
        (IMAGES[..., :1], np.repeat(IMAGES[..., :1], 3, axis=-1)),  # gray N x H x W x 1
        (IMAGES[0, ..., 0], np.repeat(IMAGES[:1, ..., :1], 3, axis=-1)),  # one gray image
        (np.zeros((0, 16, 16, 3), np.uint8), np.zeros((0, 16, 16, 3), np.uint8)),
    ],
)
def test_convertible_inputs_become_uint8_rgb(given, expected):
    images = as_images(given, SIZE)
    assert images.dtype == np.uint8 and np.array_equal(images, expected)


@pytest.mark.parametrize("as_list", [lambda images: images, lambda images: [image.tolist() for image in images]])
def test_differently_sized_images_are_each_resized(as_list):
    given = as_list([IMAGES[0], OTHER, OTHER[..., 0] / 255.0])  # the same image as RGB and as gray floats
    images = as_images(given, SIZE)
    resized = resize_square(OTHER[None], 16)[0]
    assert images.shape == (3, 16, 16, 3) and images.dtype == np.uint8
    assert np.array_equal(images[0], IMAGES[0]) and np.array_equal(images[1], resized)
    assert np.array_equal(images[2], resize_square(np.repeat(OTHER[None, ..., :1], 3, axis=-1), 16)[0])


@pytest.mark.parametrize(
    "given, why",
    [
        (IMAGES.astype(np.float32), "floats must lie in [0, 1]"),  # 0-255 floats: refused, not guessed at
        (np.full((1, 4, 4, 3), np.nan), "NaN"),
        (IMAGES.astype(np.int64) - 1, "not 0-255"),
        (IMAGES.transpose(0, 3, 1, 2), "shape (2, 3, 16, 16)"),  # channels first
        (IMAGES[..., :2], "shape (2, 16, 16, 2)"),
        (IMAGES[None], "shape (1, 2, 16, 16, 3)"),
        (IMAGES.astype(bool), "bool"),
        ("an image", "got str"),
        ({"image": IMAGES}, "got dict"),
        ([], "shape (0,)"),
        ([IMAGES[0], "x"], "got a list of 2 items"),
        ([IMAGES[0], OTHER.transpose(2, 0, 1)], "got a list of 2 items"),
        (np.zeros((1, 0, 16, 3), np.uint8), "shape (1, 0, 16, 3)"),
    ],
)
def test_anything_else_is_refused_in_one_line(given, why):
    with pytest.raises(InputError) as raised:
        as_images(given, SIZE)
    message = raised.value.message
    assert message.startswith("expected uint8 ") and "N x H x W x 3" in message and "resized to 16 x 16" in message
    assert why in message and "\n" not in message and len(message) < 400  # the expectation, not the array


# -- the registered model ------------------------------------------------------------------------------------------


def test_registered_model_accepts_them_in_process_and_through_the_scoring_server(tmp_path, monkeypatch):
    """`predict` in process, and the scoring server's own request handling (what `mlflow models serve` runs for a
    POST to /invocations) called in process: same answers, and the same one-line refusal."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc.scoring_server import invocations

    model = mlflow.pyfunc.load_model(register(tmp_path))
    assert model.metadata.get_input_schema().inputs[0].shape == (-1, -1, -1, 3)  # the signature shows uint8 RGB
    reference = model.predict(IMAGES)
    other = model.predict(resize_square(OTHER[None], 16))
    gray = model.predict(np.repeat(IMAGES[..., :1], 3, axis=-1))
    assert reference.shape == (2, model.metadata.signature.outputs.inputs[0].shape[1])

    def over_http(inputs) -> np.ndarray:
        response = invocations(
            json.dumps({"inputs": inputs}), "application/json", model, model.metadata.get_input_schema()
        )
        assert response.status == 200, response.response
        return np.array(json.loads(response.response)["predictions"], dtype=np.float32)

    for given, expected in [
        (IMAGES, reference),
        (IMAGES / 255.0, reference),
        (IMAGES[..., 0], gray),
        (IMAGES[..., :1], gray),
        ([IMAGES[0], OTHER], np.concatenate([reference[:1], other])),
    ]:
        assert np.allclose(model.predict(given), expected, atol=1e-5)
        as_json = [image.tolist() for image in given] if isinstance(given, list) else given.tolist()
        assert np.allclose(over_http(as_json), expected, atol=1e-5)

    for call in (lambda: model.predict(IMAGES.astype(np.float64)), lambda: over_http(IMAGES.astype(float).tolist())):
        with pytest.raises(MlflowException) as raised:
            call()
        assert raised.value.message.startswith("expected uint8 ") and "\n" not in raised.value.message


@pytest.mark.slow
def test_mlflow_models_serve_answers_over_http(tmp_path, monkeypatch):
    """The real server (`mlflow models serve --env-manager local`): a list of differently sized images and float
    images are embedded; a 0-255 float array gets a 400 whose message is one line."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    uri = register(tmp_path)
    port = free_port()
    log = open(tmp_path / "serve.log", "wb")
    server = subprocess.Popen(
        [Path(sys.executable).parent / "mlflow", "models", "serve", "-m", uri, "--env-manager", "local"]
        + ["-h", "127.0.0.1", "-p", str(port)],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=log,
        start_new_session=True,  # its own process group: the server's workers are stopped with it
    )

    def post(inputs) -> tuple[int, dict]:
        body = json.dumps({"inputs": inputs}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=1)
                break
            except OSError:
                assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "the server did not answer /ping within 60 s"
                time.sleep(0.25)
        status, answer = post([IMAGES[0].tolist(), OTHER.tolist()])
        assert status == 200 and np.array(answer["predictions"]).shape[0] == 2
        status, floats = post((IMAGES / 255.0).tolist())
        assert status == 200 and np.array(floats["predictions"]).shape[0] == 2
        assert np.allclose(floats["predictions"][0], answer["predictions"][0], atol=1e-5)
        status, refusal = post(IMAGES.astype(float).tolist())
        assert status == 400 and refusal["message"].startswith("expected uint8 ") and "\n" not in refusal["message"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


# -- its requirements ------------------------------------------------------------------------------------------------

LOADER = textwrap.dedent(
    """
    import json, sys
    import mlflow, numpy as np

    model = mlflow.pyfunc.load_model(sys.argv[1])
    embeddings = model.predict([np.zeros((16, 16, 3), np.uint8), np.zeros((20, 24), np.uint8)])
    import selfsup
    try:
        import ray  # selfsup's dependency, not the model's
        ray_missing = False
    except ModuleNotFoundError:
        ray_missing = True
    print(json.dumps({"shape": list(embeddings.shape), "selfsup": selfsup.__file__, "ray_missing": ray_missing}))
    """
)


def dependency_closure(requirements: list[str]) -> set[str]:
    """The distributions `pip install <requirements>` would install here: each requirement and, recursively, what
    its installed metadata requires (markers evaluated here, extras only where asked for)."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen, todo = set(), [Requirement(line) for line in requirements]
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = distribution(requirement.name).requires or []
        except PackageNotFoundError:
            continue  # not installed here (e.g. another platform's): nothing of it can be imported anyway
        extras = requirement.extras or {""}
        for dependency in map(Requirement, requires):
            if dependency.marker is None or any(dependency.marker.evaluate({"extra": extra}) for extra in extras):
                todo.append(dependency)
    return seen


def site_with_only(distributions: set[str], folder: Path) -> Path:
    """A folder of links to the installed files of `distributions` only (their top-level packages and modules, and
    their .dist-info): on the PYTHONPATH of `python -S` (no site-packages), all that can be imported beyond the
    standard library. A namespace package (google, opentelemetry) is linked whole, with what other distributions
    put in it."""
    from importlib.metadata import PackageNotFoundError, distribution

    folder.mkdir()
    for name in distributions:
        try:
            installed = distribution(name)
        except PackageNotFoundError:
            continue
        for top in {Path(file).parts[0] for file in installed.files or []}:
            source = Path(installed.locate_file(top))
            if top != ".." and not top.endswith(".pth") and source.exists() and not (folder / top).exists():
                (folder / top).symlink_to(source)
    return folder


def load_with_only(requirements: list[str], uri: str, root: Path, name: str) -> subprocess.CompletedProcess:
    """Load `uri` and embed two images in a Python that has only `requirements` and their dependencies installed."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONPATH"] = str(site_with_only(dependency_closure(requirements), root / name))
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{root}/mlflow.db"
    return subprocess.run(
        [sys.executable, "-S", "-c", LOADER, uri], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_recorded_requirements_are_enough_to_load_the_model(tmp_path, monkeypatch):
    """A resnet18 encoder loads and embeds where only its recorded requirements (and what they pull in) can be
    imported, with the library from the model's own code; without torchvision it cannot."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    from importlib.metadata import version

    import mlflow
    from packaging.requirements import Requirement

    uri = register(tmp_path, backbone="resnet18")
    lines = Path(mlflow.pyfunc.get_model_dependencies(uri)).read_text().splitlines()
    requirements = [line for line in lines if line.strip() and not line.startswith(("#", "-"))]
    names = {Requirement(line).name for line in requirements}
    assert names == {"torch", "torchvision", "numpy", "pydantic", "mlflow"}
    for line in requirements:  # pinned to what runs here, without a local label (+cpu)
        requirement = Requirement(line)
        assert str(requirement.specifier) == f"=={version(requirement.name).split('+')[0]}"

    loaded = load_with_only(requirements, uri, tmp_path, "site")
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    result = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert result["shape"][0] == 2 and result["ray_missing"]  # only what was asked for is there
    assert "/artifacts/code/selfsup/" in result["selfsup"]  # the library came with the model

    without_torchvision = [line for line in requirements if Requirement(line).name != "torchvision"]
    failed = load_with_only(without_torchvision, uri, tmp_path, "site-without-torchvision")
    assert failed.returncode != 0 and "needs torchvision: pip install torchvision" in failed.stderr  # not "corrupt"
