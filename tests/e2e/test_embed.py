"""`python -m pipelines.embed`: a folder of images of any size, embedded by the registered encoder through Ray Data,
into Parquet shards that equal the model's own `predict`; a re-run writes only the missing shards; bad input is one
line before Ray starts."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.conftest import ROOT
from tests.unit.test_serving import register

pytestmark = pytest.mark.slow

SIZES = [(16, 16), (24, 20), (40, 30), (9, 31)]  # (height, width): the model's own, and others it resizes


def embed(*args: str, env: dict[str, str], command: str = "embed") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"pipelines.{command}", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def search(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return embed(*args, env=env, command="search")


@pytest.fixture(scope="module")
def registry(tmp_path_factory, shared_ray_address) -> tuple[Path, dict[str, str]]:
    """A registered encoder (version 1 @champion) in a store of its own, and the env that points the command at it
    and at the suite's Ray cluster."""
    root = tmp_path_factory.mktemp("registry")
    register(root)  # into root's own store, whatever MLFLOW_TRACKING_URI says
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "RAY_ADDRESS": shared_ray_address,
        "PYTHONPATH": str(ROOT / "ssl"),
    }
    return root, env


def photo_folder(folder: Path, count: int) -> dict[str, np.ndarray]:
    """`count` PNGs of random pixels in nested folders, of several sizes, one of them gray; path -> its RGB pixels."""
    rng = np.random.default_rng(1)
    images = {}
    for index in range(count):
        height, width = SIZES[index % len(SIZES)]
        path = folder / f"day{index % 3}" / "roll" / f"{index:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        if index == 5:
            pixels = np.repeat(pixels[..., :1], 3, axis=-1)
            Image.fromarray(pixels[..., 0]).save(path)  # stored gray: read as RGB
        else:
            Image.fromarray(pixels).save(path)
        images[str(path.resolve())] = pixels
    (folder / "notes.txt").write_text("not an image, and not named like one")
    return images


def read_shards(out: Path) -> dict[str, np.ndarray]:
    rows = {}
    for shard in sorted(out.glob("embeddings-*.parquet")):
        table = pq.read_table(shard)
        assert set(table.column("model").to_pylist()) == {"test-encoder"}
        assert set(table.column("version").to_pylist()) == {"1"}
        for path, embedding in zip(table.column("path").to_pylist(), table.column("embedding").to_numpy()):
            rows[path] = np.asarray(embedding, dtype=np.float32)
    return rows


def test_shards_equal_the_models_predict_and_a_rerun_writes_only_what_is_missing(registry, tmp_path) -> None:
    root, env = registry
    images = photo_folder(tmp_path / "photos", 50)
    original = sorted(images)[7]
    copy = Path(original).with_name("copy-of-an-image.png")  # a near-duplicate to find: the same pixels
    copy.write_bytes(Path(original).read_bytes())
    images[str(copy)] = images[original]
    broken = tmp_path / "photos" / "day2" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really a jpeg")
    out = tmp_path / "embeddings"
    args = ["--images", str(tmp_path / "photos"), "--out", str(out), "--model", "models:/test-encoder@champion"]
    args += ["--images-per-shard", "16", "--batch-size", "8"]
    first = embed(*args, env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "51 of 52 images embedded by test-encoder version 1" in first.stdout and "4 written now" in first.stdout
    assert "1 unreadable skipped" in first.stdout, first.stdout
    assert "embed: 52 of 52 images (" in first.stderr  # the progress line, with images/s

    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    model = mlflow.pyfunc.load_model("models:/test-encoder/1")
    rows = read_shards(out)
    assert rows.keys() == images.keys()
    paths = sorted(images)
    expected = model.predict([images[path] for path in paths])  # any sizes: the model resizes them itself
    np.testing.assert_allclose(np.stack([rows[path] for path in paths]), expected, rtol=1e-5, atol=1e-5)
    with open(out / "skipped.csv") as f:
        skipped = list(csv.DictReader(f))
    assert [row["path"] for row in skipped] == [str(broken.resolve())] and skipped[0]["reason"]

    # An interrupted run leaves whole shards only (each is renamed into place once written); remove two, as if the
    # run had stopped before them, and leave a partial file behind: the re-run writes those two and nothing else.
    shards = sorted(out.glob("embeddings-*.parquet"))
    kept = {shard: shard.stat().st_mtime_ns for shard in (shards[0], shards[2])}
    shards[1].unlink()
    shards[3].unlink()
    shards[3].with_suffix(".parquet.partial").write_bytes(b"half a shard")
    again = embed(*args, env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "2 written now" in again.stdout and "51 of 52 images embedded" in again.stdout
    assert {shard: shard.stat().st_mtime_ns for shard in kept} == kept
    rewritten = read_shards(out)
    np.testing.assert_array_equal(np.stack([rewritten[p] for p in paths]), np.stack([rows[p] for p in paths]))
    report = json.loads((out / "report.json").read_text())
    assert (report["embedded"], report["skipped"], report["shards"], report["shards_written"]) == (51, 1, 4, 2)

    # Searched: an image's nearest is itself, the copy is the one near-duplicate pair.
    index = tmp_path / "index"
    built = search("build", "--embeddings", str(out), "--index", str(index), env=env)
    assert built.returncode == 0 and "indexed 51 embeddings of test-encoder version 1 (exact)" in built.stdout, built
    asked = search("query", "--index", str(index), "--image", paths[3], "-k", "3", env=env)
    assert asked.returncode == 0, asked.stdout + asked.stderr
    nearest = asked.stdout.splitlines()[1].split()
    assert nearest[0] == "1" and float(nearest[1]) > 0.9999 and nearest[2] == paths[3], asked.stdout
    assert len(asked.stdout.splitlines()) == 4
    report_folder = tmp_path / "report"
    found = search("duplicates", "--index", str(index), "--threshold", "0.99999", "--out", str(report_folder), env=env)
    assert found.returncode == 0 and "1 pairs of the 51 images" in found.stdout, found.stdout + found.stderr
    with open(report_folder / "duplicates.csv") as f:
        assert [sorted([row["path_a"], row["path_b"]]) for row in csv.DictReader(f)] == [sorted([original, str(copy)])]
    assert (report_folder / "duplicates.png").stat().st_size > 1000

    # Made by version 1: embeddings of another version are refused, not mixed in, and so are its queries.
    register(root)  # version 2 (the same score does not beat the champion: it is the challenger)
    from selfsup.embedding import EmbedError, EmbedJob, embed_collection

    with pytest.raises(EmbedError, match="holds embeddings of another model version"):  # before Ray: in this process
        embed_collection(EmbedJob("models:/test-encoder/2", str(tmp_path / "photos"), out, env["MLFLOW_TRACKING_URI"]))
    asked = search(
        "query", "--index", str(index), "--image", paths[3], "--model", "models:/test-encoder@challenger", env=env
    )
    assert asked.returncode == 2 and "the queries come from test-encoder version 2" in asked.stderr, asked.stderr
    assert asked.stderr.count("\n") == 1


def test_a_bad_folder_is_one_line_before_ray_starts(registry, tmp_path) -> None:
    root, env = registry
    env = {**env, "RAY_ADDRESS": "127.0.0.1:1"}  # nothing listens there: Ray must not be reached
    done = embed("--images", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"), env=env)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stdout + done.stderr
    assert "--images" in done.stderr and "is not a folder" in done.stderr
    assert not (tmp_path / "out").exists()
