"""Datasets larger than memory: training images written once as Parquet shards and streamed by Ray Data to the
Ray Train workers (`ray.train.get_dataset_shard`), for real on the shared Ray cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT, changed_params, run

pytestmark = pytest.mark.slow

# Shards of 400 images whose pixels say their index, read for three epochs by two workers (each rank writes what
# it read), then by one worker twice: two Datasets of the same shards and seed.
SCRIPT = r"""
import json, sys, tempfile
from pathlib import Path
import numpy as np
import ray, ray.train
from ray.train.torch import TorchTrainer
from selfsup.data.shards import ShardWriter, read_streamed
from selfsup.train.ray_trainer import RayStreamedImages, connect_ray

folder = tempfile.mkdtemp()
writer = ShardWriter("file://" + folder, images_per_shard=50)
for i in range(400):  # gray, two 8 x 8 JPEG blocks whose levels (steps of 12) say i
    halves = np.concatenate([np.full((16, 8), i % 20 * 12), np.full((16, 8), i // 20 * 12)], axis=1)
    writer.add(np.repeat(halves[..., None], 3, axis=-1).astype(np.uint8))
writer.close()

def three_epochs(dataset):
    images = RayStreamedImages(400, seed=0, dataset=dataset)
    epochs = []
    for epoch in range(3):
        seen = []
        for batch, indices, labels in images.batches(epoch, 50, "cpu"):
            assert batch.shape == (50, 16, 16, 3) and (labels == -1).all()
            levels = (batch[:, 8, [4, 12], 0].float() / 12).round().long()  # the pixels say which image
            assert (levels[:, 0] + 20 * levels[:, 1] == indices).all(), (levels, indices)
            seen += indices.tolist()
        epochs.append(seen)
    return epochs

def each_rank(config):
    rank = ray.train.get_context().get_world_rank()
    Path(folder, f"rank{rank}.json").write_text(json.dumps(three_epochs("train")))

def twice(config):
    return {"train": three_epochs("train"), "again": three_epochs("again")}

connect_ray()
def fit(loop, workers, datasets):
    return TorchTrainer(
        loop,
        datasets={name: read_streamed("file://" + folder, writer.files, seed=0, image_size=16) for name in datasets},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 0.5}),
        run_config=ray.train.RunConfig(storage_path=tempfile.mkdtemp()),
    ).fit().return_value
fit(each_rank, 2, ["train"])
ranks = [json.loads(Path(folder, f"rank{rank}.json").read_text()) for rank in (0, 1)]
print("RESULT", json.dumps({"ranks": ranks, **fit(twice, 1, ["train", "again"])}))
"""


def test_workers_read_disjoint_parts_covering_every_image_once_an_epoch_in_a_new_seeded_order(shared_ray_address):
    env = {**os.environ, "RAY_ADDRESS": shared_ray_address, "PYTHONPATH": str(ROOT / "ssl")}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    runs = json.loads(result.stdout.split("RESULT ")[1])
    first, second = runs["ranks"]
    for epoch in range(3):  # the two workers' parts: disjoint halves that together are every image, once
        assert len(first[epoch]) == len(second[epoch]) == 200
        assert sorted(first[epoch] + second[epoch]) == list(range(400))
    one, again = runs["train"], runs["again"]
    for seen in one:
        assert sorted(seen) == list(range(400))  # one worker: every image once an epoch
    assert one[0] != one[1] != one[2]  # a new order each epoch ...
    assert one == again  # ... the same for the same seed


def test_a_streamed_run_learns_as_the_in_memory_run_of_the_same_images(tiny_repo):
    """The same folder of unlabelled digits, prepared into memory and as shards, pretrained the same way and
    judged on the embedded digits (eval.data): comparable loss, RankMe and kNN. The shards hold JPEGs (quality
    95), so the images differ by about a grey level and the numbers are close, not equal."""
    from tests.e2e.test_pipeline import unlabelled_folder

    repo, env = tiny_repo
    images = unlabelled_folder(repo.parent / "photos", count=600)
    measured = {}
    for streaming in (False, True):
        params = {
            "data": {"source": "folder", "root": str(images), "streaming": streaming, "images_per_shard": 100},
            "eval": {"data": {"source": "digits"}},
            "train": {"epochs": 3, "batch_size": 64},
        }
        stages = [["prepare"], ["prepare", "eval"], ["pretrain"]] if not streaming else [["prepare"], ["pretrain"]]
        with changed_params(repo, params):
            for stage in stages:  # the evaluation data once: the same digits for both
                done = run(["python", "-m", "pipelines." + stage[0], *stage[1:]], repo, env)
                assert done.returncode == 0, done.output[-3000:]
        measured[streaming] = json.loads((repo / "metrics" / "pretrain.json").read_text())
    manifest = json.loads((repo / "data" / "prepared" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["files"] == [f"train-{i:05d}.parquet" for i in range(6)]  # 540 of 600
    assert not (repo / "data" / "prepared" / "train.npz").exists()
    in_memory, streamed = measured[False], measured[True]
    assert streamed["epochs"] == in_memory["epochs"] == 3
    assert streamed["final_loss"] == pytest.approx(in_memory["final_loss"], rel=0.1), measured
    assert streamed["rankme"] == pytest.approx(in_memory["rankme"], rel=0.25), measured
    assert abs(streamed["val_knn_top1"] - in_memory["val_knn_top1"]) < 0.08, measured
    assert np.isfinite(streamed["final_loss"]) and streamed["val_knn_top1"] > 0.5  # digits: 10 classes
