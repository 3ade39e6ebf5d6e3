"""Datasets larger than memory: training images written once as Parquet shards and streamed by Ray Data to the
Ray Train workers (`ray.train.get_dataset_shard`), for real on the shared Ray cluster.

One script does the Ray work of the module (a Python, Ray and Ray Train start-up is most of each part's cost):
two workers read shards whose pixels say their index; the Dataset's own passes are read twice from two Datasets
of the same seed; a worker streams a pass over images that would take far more memory decoded than the worker
and the driver grow by; and a folder of unlabelled digits is prepared into memory and as shards and pretrained
both ways, each judged on the embedded digits."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

SCRIPT = r"""
import json, sys, tempfile, threading
from pathlib import Path
import numpy as np
import psutil
import pyarrow as pa, pyarrow.parquet as pq
import ray, ray.train
from ray.train.torch import TorchTrainer
from selfsup.config import DataConfig
from selfsup.data.arrays import load_split
from selfsup.data.shards import SHARD_PATTERN, Shards, ShardWriter, encode_jpeg, read_streamed
from selfsup.data.sources import prepare_dataset
from selfsup.params import load_params
from selfsup.train.loop import LocalSession, PretrainSpec, train_loop
from selfsup.train.monitor import LabelledProbe, Monitor
from selfsup.train.ray_trainer import RayStreamedImages, connect_ray, pretrain_with_ray

folder, photos = Path(tempfile.mkdtemp()), Path(sys.argv[1])
writer = ShardWriter("file://" + str(folder / "numbered"), images_per_shard=50)
for i in range(400):  # gray, two 8 x 8 JPEG blocks whose levels (steps of 12) say i
    halves = np.concatenate([np.full((16, 8), i % 20 * 12), np.full((16, 8), i // 20 * 12)], axis=1)
    writer.add(np.repeat(halves[..., None], 3, axis=-1).astype(np.uint8))
writer.close()

def each_rank(config):
    images = RayStreamedImages(400, seed=0)
    epochs = []
    for epoch in range(3):
        seen = []
        for batch, indices, labels in images.batches(epoch, 50, "cpu"):
            assert batch.shape == (50, 16, 16, 3) and (labels == -1).all()
            levels = (batch[:, 8, [4, 12], 0].float() / 12).round().long()  # the pixels say which image
            assert (levels[:, 0] + 20 * levels[:, 1] == indices).all(), (levels, indices)
            seen += indices.tolist()
        epochs.append(seen)
    rank = ray.train.get_context().get_world_rank()
    Path(folder, f"rank{rank}.json").write_text(json.dumps(epochs))

connect_ray(streaming=True)
numbered = lambda: read_streamed("file://" + str(folder / "numbered"), writer.files, seed=0, image_size=16)
TorchTrainer(
    each_rank,
    datasets={"train": numbered()},
    scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
    run_config=ray.train.RunConfig(storage_path=tempfile.mkdtemp()),
).fit()
ranks = [json.loads(Path(folder, f"rank{rank}.json").read_text()) for rank in (0, 1)]
passes = lambda dataset: [[int(i) for b in dataset.iter_batches(batch_size=None) for i in b["index"]] for _ in range(3)]
result = {"ranks": ranks, "passes": passes(numbered()), "again": passes(numbered())}

# 60,000 images of 64 px, 700 MiB decoded (as arrays in memory), about 100 MiB as JPEGs: 60 shards, each the same 1,000
# encoded images (distinct enough for the decoder; the reading path is what is measured here).
rng = np.random.default_rng(0)
blocky = lambda: rng.integers(0, 256, (8, 8, 3), dtype=np.uint8).repeat(8, axis=0).repeat(8, axis=1)  # ~1.7 KB as JPEG
encoded = pa.array([encode_jpeg(blocky()) for _ in range(1000)])
large = folder / "large"
large.mkdir()
for shard in range(60):
    pq.write_table(pa.table({"index": pa.array(np.arange(shard * 1000, shard * 1000 + 1000), pa.int64()),
                             "label": pa.array(np.full(1000, -1), pa.int64()), "image": encoded}),
                   large / SHARD_PATTERN.format(shard))

def one_pass(config):
    worker = psutil.Process()
    images = RayStreamedImages(60_000, seed=0)
    before, peak, seen = worker.memory_info().rss, 0, 0
    for batch, indices, labels in images.batches(0, 256, "cpu"):
        assert batch.shape == (256, 64, 64, 3)
        seen += len(indices)
        peak = max(peak, worker.memory_info().rss)
    Path(folder, "large.json").write_text(json.dumps({"seen": seen, "growth": peak - before}))

driver, driver_peak, done = psutil.Process(), [0], threading.Event()
def sample():
    while not done.wait(0.1):
        driver_peak[0] = max(driver_peak[0], driver.memory_info().rss)
driver_before = driver.memory_info().rss
sampler = threading.Thread(target=sample)
sampler.start()
TorchTrainer(
    one_pass,
    datasets={"train": read_streamed("file://" + str(large), sorted(p.name for p in large.iterdir()), 0, 64)},
    scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
    run_config=ray.train.RunConfig(storage_path=tempfile.mkdtemp()),
).fit()
done.set()
sampler.join()
large_pass = json.loads(Path(folder, "large.json").read_text())
result["large"] = {**large_pass, "driver_growth": driver_peak[0] - driver_before, "decoded": 60_000 * 64 * 64 * 3}

# The same unlabelled folder in memory and as shards, pretrained alike, watched on the embedded digits.
digits = folder / "digits"
prepare_dataset(DataConfig(source="digits"), digits)
probe = LabelledProbe(load_split(digits, "train").labels, *(lambda v: (v.images, v.labels))(load_split(digits, "val")),
                      bank_images=load_split(digits, "train").images)
params = load_params({"data": {"source": "folder", "root": str(photos)}, "mlflow": {"champion_metric": "rankme"},
                      "train": {"epochs": 2, "batch_size": 64, "warmup_epochs": 0, "monitor_every": 1},
                      "scaling": {"max_failures": 0}})
for streaming in (False, True):
    out = folder / f"prepared-{streaming}"
    manifest = prepare_dataset(DataConfig(source="folder", root=str(photos), streaming=streaming, images_per_shard=100),
                               out)
    spec = PretrainSpec.from_params(params, manifest)
    held_out = load_split(out, "val").images
    count = manifest.splits["train"]["count"]
    images = Shards(*manifest.shards(out), count) if streaming else load_split(out, "train").images
    monitor = Monitor(held_out, probe)
    if streaming:  # Ray Data's tasks feed a Ray Train worker
        state = pretrain_with_ray(images, spec, params.scaling, folder / "runs", "streamed", monitor)
    else:  # the same loop on the arrays, in this process (Ray Train's worker would run just this)
        state = train_loop(images, spec, LocalSession(), monitor)
    result[f"streaming={streaming}"] = {**state["history"][-1], "shards": manifest.splits["train"].get("files")}
print("RESULT", json.dumps(result))
"""


@pytest.fixture(scope="module")
def streamed(shared_ray_address, tmp_path_factory) -> dict:
    from tests.e2e.test_pipeline import unlabelled_folder

    photos = unlabelled_folder(tmp_path_factory.mktemp("streaming") / "photos", count=600)
    env = {**os.environ, "RAY_ADDRESS": shared_ray_address, "PYTHONPATH": str(ROOT / "ssl")}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(photos)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return json.loads(result.stdout.split("RESULT ")[1])


def test_workers_read_disjoint_parts_covering_every_image_once_an_epoch_in_a_new_seeded_order(streamed):
    first, second = streamed["ranks"]
    for epoch in range(3):  # the two workers' parts: disjoint halves that together are every image, once
        assert len(first[epoch]) == len(second[epoch]) == 200
        assert sorted(first[epoch] + second[epoch]) == list(range(400))
    assert first[0] != first[1] != first[2]  # each worker's part comes in a new order each epoch
    passes, again = streamed["passes"], streamed["again"]
    for seen in passes:
        assert sorted(seen) == list(range(400))  # every image once a pass
    assert passes[0] != passes[1] != passes[2]  # shards in a new order each pass ...
    assert passes == again  # ... the same orders for the same seed


def test_a_pass_over_images_far_larger_than_memory_grows_the_worker_and_the_driver_by_little(streamed):
    """Peak resident memory (psutil) over a pass of 60,000 images of 64 px, 700 MiB decoded: the worker takes them
    in batches as the training loop does, and holds no more than a few blocks (32 MiB each) at a time; the driver
    none. In memory, the driver and the worker would each hold the 700 MiB (benchmarks/streaming_memory.py
    measures both paths' pretraining at 10k, 100k and 400k images)."""
    large = streamed["large"]
    assert large["seen"] == 59_904  # every whole batch of 256
    assert large["growth"] < large["decoded"] / 4, large  # a few 32 MiB blocks in flight: measured 120 MiB of 703
    assert large["driver_growth"] < large["decoded"] / 10, large


def test_a_streamed_run_learns_as_the_in_memory_run_of_the_same_images(streamed):
    """The shards hold JPEGs (quality 95): the images differ by about a grey level, the numbers are close."""
    in_memory, shards = streamed["streaming=False"], streamed["streaming=True"]
    assert shards["shards"] == [f"train-{i:05d}.parquet" for i in range(6)] and in_memory["shards"] is None  # 540
    assert shards["epoch"] == in_memory["epoch"] == 2
    assert shards["loss"] == pytest.approx(in_memory["loss"], rel=0.1), streamed
    assert shards["monitor_rankme"] == pytest.approx(in_memory["monitor_rankme"], rel=0.25), streamed
    assert abs(shards["monitor_knn_top1"] - in_memory["monitor_knn_top1"]) < 0.08, streamed
    assert np.isfinite(shards["loss"]) and shards["monitor_knn_top1"] > 0.5  # digits: 10 classes
