"""Labels apart from pretraining: STL-10's unlabelled images, and a labelled evaluation dataset of its own
(eval.data; STL-10's labelled splits by default) that the monitor and every evaluation read."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

import pipelines.common as common
from selfsup.config import DataConfig
from selfsup.data.arrays import Manifest, load_split
from selfsup.data.sources import UNLABELLED, prepare_dataset
from selfsup.errors import ConfigError
from selfsup.params import load_params
from tests.conftest import copy_repo, run, stage_env
from tests.unit.data.test_unlabelled_sources import make_tree


def write_stl10(root: Path, train: int = 4, test: int = 2, unlabeled: int = 10) -> None:
    """STL-10's binary files as torchvision reads them (column-major 3 x 96 x 96 uint8, labels 1..10): image i of
    each file is a flat grey of level i, its label i % 2 + 1."""
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    for name, count in (("train", train), ("test", test), ("unlabeled", unlabeled)):
        levels = np.arange(count, dtype=np.uint8)[:, None, None, None] + (0 if name != "unlabeled" else 100)
        np.broadcast_to(levels, (count, 3, 96, 96)).tofile(folder / f"{name}_X.bin")
        if name != "unlabeled":
            (np.arange(count) % 2 + 1).astype(np.uint8).tofile(folder / f"{name}_y.bin")
    (folder / "class_names.txt").write_text("\n".join(f"class{i}" for i in range(10)) + "\n")


@pytest.fixture
def stl10(tmp_path, monkeypatch) -> Path:
    import torchvision.datasets as tvd

    # The real files' md5 sums cannot match these small ones: everything else is torchvision's own reading.
    monkeypatch.setattr(tvd.STL10, "_check_integrity", lambda self: True)
    write_stl10(tmp_path / "stl10")
    return tmp_path / "stl10"


@pytest.mark.parametrize(("split", "levels"), [("unlabeled", set(range(100, 110))), ("train+unlabeled", None)])
def test_stl10_unlabelled_images_pretrain_without_labels(stl10, tmp_path, split, levels) -> None:
    config = DataConfig(source="stl10", root=str(stl10), stl10_split=split, image_size=None)
    manifest = prepare_dataset(config, tmp_path / "prepared")
    assert not manifest.labelled and set(manifest.splits) == {"train", "val"}
    images = np.concatenate([load_split(tmp_path / "prepared", s).images for s in ("train", "val")])
    labels = np.concatenate([load_split(tmp_path / "prepared", s).labels for s in ("train", "val")])
    assert images.shape[1:] == (96, 96, 3) and (labels == UNLABELLED).all()
    seen = {int(image[0, 0, 0]) for image in images}
    assert seen == (levels or set(range(4)) | set(range(100, 110)))  # train+unlabeled: the 4 labelled ones too


def test_stl10s_labelled_splits_are_the_default_evaluation_data(stl10) -> None:
    params = load_params({"data": {"source": "stl10", "root": str(stl10), "stl10_split": "train+unlabeled"}})
    assert params.evaluation_data.source == "stl10" and params.labels_missing is None
    assert params.mlflow.champion_metric == "knn_k20_top1"  # a labelled champion: STL-10 has labels to score it
    own = load_params({"data": {"source": "stl10", "root": str(stl10)}})
    assert own.evaluation_data is None and own.labels_missing is None  # train: labelled itself
    other = {"source": "digits"}
    assert load_params({**params.model_dump(), "eval": {"data": other}}).evaluation_data.source == "digits"


def test_bad_evaluation_data_is_one_line_before_any_compute() -> None:
    unlabelled = {"source": "folder", "root": "photos"}
    with pytest.raises(ConfigError, match="eval.data.source='folder' is invalid: folder has no labels"):
        load_params({"eval": {"data": unlabelled}})
    with pytest.raises(ConfigError, match="eval.data.root is required for eval.data.source='cifar10'"):
        load_params({"eval": {"data": {"source": "cifar10"}}})
    with pytest.raises(ConfigError, match="data.stl10_split=unlabeled applies to data.source=stl10 only"):
        load_params({"data": {"stl10_split": "unlabeled"}})
    with pytest.raises(ConfigError, match="champion_metric=linear_top1 needs labelled evaluation data"):
        load_params({"data": unlabelled, "mlflow": {"champion_metric": "linear_top1"}})
    assert load_params({"data": unlabelled, "eval": {"data": {"source": "digits"}}}).labels_missing is None


def prepare(repo: Path, tmp_path: Path, *stage: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "pipelines.prepare", *stage], repo, stage_env(tmp_path, repo), timeout=120)


def test_an_unlabelled_folder_is_evaluated_on_a_labelled_dataset_of_its_own(tmp_path, monkeypatch) -> None:
    """prepare_eval writes eval.data at the pretraining images' size into data/eval; the evaluations and the
    monitor read it. Without eval.data, data/eval holds a note and they read data/prepared."""
    repo = copy_repo(tmp_path / "repo")
    make_tree(tmp_path / "photos", size=20)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"].update(source="folder", root=str(tmp_path / "photos"), image_size=12)
    params["eval"]["data"] = {"source": "digits"}
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    for stage in ((), ("eval",)):
        result = prepare(repo, tmp_path, *stage)
        assert result.returncode == 0, result.stderr
    evaluation = Manifest.read(repo / "data" / "eval")
    assert evaluation.source == "digits" and len(evaluation.class_names) == 10
    assert evaluation.image_size == [12, 12] and set(evaluation.splits) == {"train", "val", "test"}

    monkeypatch.setattr(common, "PREPARED", repo / "data" / "prepared")
    monkeypatch.setattr(common, "EVAL_DATA", repo / "data" / "eval")
    assert common.evaluation_data() == repo / "data" / "eval"
    loaded = load_params(params)
    train, val = (load_split(repo / "data" / "prepared", s) for s in ("train", "val"))
    monitor = common.pretraining_monitor(loaded, train, val)
    assert len(monitor.held_out) == len(val.images)  # RankMe on the pretraining data's own held-out images
    digits_train = load_split(repo / "data" / "eval", "train")
    assert np.array_equal(monitor.probe.bank_images, digits_train.images)  # kNN on the digits
    assert np.array_equal(monitor.probe.bank_labels, digits_train.labels)

    params["eval"]["data"], params["mlflow"]["champion_metric"] = None, "rankme"  # no labels anywhere
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    assert prepare(repo, tmp_path, "eval").returncode == 0
    assert [path.name for path in (repo / "data" / "eval").iterdir()] == ["README"]
    assert common.evaluation_data() == repo / "data" / "prepared"
    monitor = common.pretraining_monitor(load_params(params), train, val)
    assert monitor.probe is None and len(monitor.held_out) == len(val.images)  # RankMe alone
