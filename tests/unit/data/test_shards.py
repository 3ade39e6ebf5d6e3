"""Training images as Parquet shards (selfsup.data.shards): what prepare writes for a dataset past the memory
budget, and the checks made before Ray starts. The streaming itself runs in tests/e2e/test_streaming.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from selfsup.config import DataConfig
from selfsup.data import sources
from selfsup.data.arrays import ChannelMoments, Manifest, load_split
from selfsup.data.shards import ShardWriter, check_shards, decode_batch, encode_jpeg, read_shard
from selfsup.data.sources import UNLABELLED, prepare_dataset, streams
from selfsup.errors import ConfigError, DatasetError
from selfsup.params import load_params
from tests.unit.data.test_unlabelled_sources import make_tree


def test_shards_hold_the_images_as_jpegs_numbered_in_order(tmp_path: Path) -> None:
    writer = ShardWriter(str(tmp_path / "shards"), images_per_shard=4)
    levels = [10 * i for i in range(10)]
    for level in levels:
        writer.add(np.full((8, 8, 3), level, np.uint8))
    writer.close()
    assert writer.files == ["train-00000.parquet", "train-00001.parquet", "train-00002.parquet"] and writer.count == 10
    decoded = [next(read_shard({"path": [str(tmp_path / "shards" / name)]})) for name in writer.files]
    images = np.concatenate([part["image"] for part in decoded])
    assert np.concatenate([part["index"] for part in decoded]).tolist() == list(range(10))
    assert (np.concatenate([part["label"] for part in decoded]) == UNLABELLED).all()
    assert np.abs(images.reshape(10, -1).mean(1) - levels).max() < 1.5  # JPEG at quality 95: a grey level apart
    mean, std = writer.mean_std()
    assert mean[0] == pytest.approx(np.mean(levels) / 255, abs=1e-6) and std[0] > 0


def test_a_row_that_does_not_decode_is_dropped_not_raised(tmp_path: Path) -> None:
    writer = ShardWriter(str(tmp_path), images_per_shard=3)
    for level in (0, 100, 200):
        writer.add(np.full((8, 8, 3), level, np.uint8))
    writer.close()
    table = pq.read_table(tmp_path / writer.files[0]).to_pydict()
    batch = {name: np.array(values, dtype=object if name == "image" else None) for name, values in table.items()}
    batch["image"][1] = b"\xff\xd8 not a jpeg"
    decoded = decode_batch(batch)
    assert decoded["index"].tolist() == [0, 2] and decoded["image"].shape == (2, 8, 8, 3)


def test_a_folder_past_the_memory_budget_is_prepared_as_shards_in_a_random_order(tmp_path: Path, joined_ray) -> None:
    make_tree(tmp_path / "images", [f"{d}/{i}.png" for d in range(3) for i in range(10)], size=12)
    config = DataConfig(source="folder", root=str(tmp_path / "images"), image_size=8, images_per_shard=10)
    assert not streams(config, 30)  # 30 images of 8 px: far below 8 GB
    tiny_budget = config.model_copy(update={"memory_budget_gb": 30 * 8 * 8 * 3 / 2**30 * 0.99})
    assert streams(tiny_budget, 30)
    manifest = prepare_dataset(tiny_budget, tmp_path / "prepared")
    assert manifest.streamed and not manifest.labelled and manifest.image_size == [8, 8]
    assert manifest.splits["train"]["count"] == 27 and manifest.splits["val"]["count"] == 3
    uri, files = manifest.shards(tmp_path / "prepared")
    assert uri == str((tmp_path / "prepared" / "shards").resolve()) and len(files) == 3
    check_shards(uri, files)  # all there
    assert load_split(tmp_path / "prepared", "val").images.shape == (3, 8, 8, 3)  # held out, in memory
    with pytest.raises(DatasetError, match="the train split of .* is streamed from shards"):
        load_split(tmp_path / "prepared", "train")
    again = Manifest.read(tmp_path / "prepared")
    assert again.sha256 == manifest.sha256 and again.streamed


@pytest.fixture
def joined_ray(shared_ray_address, monkeypatch) -> Iterator[None]:
    """prepare writes shards through Ray Data: on the tests' shared cluster, left afterwards."""
    import ray

    monkeypatch.setenv("RAY_ADDRESS", shared_ray_address)
    yield
    ray.shutdown()


def test_ray_data_tasks_write_the_bytes_one_process_would_in_order(tmp_path: Path, joined_ray, monkeypatch) -> None:
    """Decoding, resizing and encoding run in Ray Data tasks (several here); the shards hold exactly the JPEGs this
    process makes of the same files, numbered in order, the held-out images their raw pixels, the broken file
    skipped, and the channel statistics those of the written images."""
    monkeypatch.setattr(sources, "PATHS_PER_TASK", 9)
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for index in range(40):  # not square: the centre is cropped
        (root / str(index % 3)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 16, 3), dtype=np.uint8)).save(root / str(index % 3) / f"{index}.png")
    (root / "0" / "broken.png").write_bytes(b"\x89PNG broken")
    config = DataConfig(
        source="folder", root=str(root), image_size=8, streaming=True, images_per_shard=16, max_unreadable_fraction=0.05
    )
    manifest = prepare_dataset(config, tmp_path / "prepared")

    here = {}  # raw pixels -> JPEG, made in this process
    for path in root.rglob("*.png"):
        if path.name != "broken.png":
            image = sources.center_crop_resize(sources._decode_image(path, 10**8), 8).permute(1, 2, 0).numpy()
            here[image.tobytes()] = encode_jpeg(image)
    uri, files = manifest.shards(tmp_path / "prepared")
    tables = [pq.read_table(f"{uri}/{name}") for name in files]
    stored = [jpeg for table in tables for jpeg in table.column("image").to_pylist()]
    assert [i for table in tables for i in table.column("index").to_pylist()] == list(range(len(stored)))
    held_out = {image.tobytes() for image in load_split(tmp_path / "prepared", "val").images}
    assert held_out < here.keys() and len(held_out) + len(stored) == len(here) == 40
    assert sorted(stored) == sorted(jpeg for raw, jpeg in here.items() if raw not in held_out)
    written = ChannelMoments()
    written.add(np.stack([np.frombuffer(raw, np.uint8) for raw in here if raw not in held_out]).reshape(-1, 8, 8, 3))
    assert manifest.mean == written.mean_std()[0] and manifest.std == written.mean_std()[1]


def test_unreadable_files_are_skipped_and_counted_and_past_the_threshold_one_line(
    tmp_path: Path, joined_ray, capsys
) -> None:
    make_tree(tmp_path / "images", [f"{i}.png" for i in range(20)], size=12)
    (tmp_path / "images" / "5.png").write_bytes(b"\x89PNG broken")
    config = DataConfig(
        source="folder", root=str(tmp_path / "images"), image_size=8, streaming=True, max_unreadable_fraction=0.1
    )
    manifest = prepare_dataset(config, tmp_path / "prepared")
    assert manifest.splits["train"]["count"] + manifest.splits["val"]["count"] == 19  # 5.png held out or skipped
    strict = config.model_copy(update={"max_unreadable_fraction": 0.0})
    (tmp_path / "images" / "6.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DatasetError, match="image files cannot be read, more than data.max_unreadable_fraction=0.0"):
        prepare_dataset(strict, tmp_path / "strict")


def test_missing_shards_and_bad_streaming_params_are_one_line(tmp_path: Path) -> None:
    writer = ShardWriter("file://" + str(tmp_path), images_per_shard=1)
    for _ in range(3):
        writer.add(np.zeros((8, 8, 3), np.uint8))
    writer.close()
    (tmp_path / writer.files[1]).unlink()
    with pytest.raises(DatasetError, match="1 of the 3 shards are missing at file://.*re-run `dvc repro -f prepare`"):
        check_shards("file://" + str(tmp_path), writer.files)
    with pytest.raises(DatasetError, match="cannot write shards to data.shards_uri=nosuch://bucket/x"):
        ShardWriter("nosuch://bucket/x", images_per_shard=1)
    with pytest.raises(ConfigError, match="data.streaming: true applies to data.source folder and filelist"):
        load_params({"data": {"streaming": True}})
    with pytest.raises(ConfigError, match="data.streaming: true needs data.image_size"):
        load_params({"data": {"source": "folder", "root": "x", "streaming": True, "image_size": None}})


def test_ray_datas_scheduling_loop_polls_instead_of_spinning(monkeypatch) -> None:
    """A step that returns at once (nothing to wait for) is padded to SCHEDULER_STEP_FLOOR_S; once only."""
    import time

    from ray.data._internal.execution.streaming_executor import StreamingExecutor

    from selfsup.ray_cluster import SCHEDULER_STEP_FLOOR_S, throttle_ray_data_scheduler

    steps = []
    monkeypatch.setattr(StreamingExecutor, "_scheduling_loop_step", lambda self, topology: steps.append(1) or True)
    throttle_ray_data_scheduler()
    throttle_ray_data_scheduler()  # a second process start in the same interpreter: not wrapped twice
    started = time.perf_counter()
    for _ in range(10):
        assert StreamingExecutor._scheduling_loop_step(None, {}) is True
    assert time.perf_counter() - started >= 10 * SCHEDULER_STEP_FLOOR_S and len(steps) == 10
