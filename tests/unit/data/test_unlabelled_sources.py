"""Pretraining data without labels: `folder` (every image below one or several folders, any structure) and
`filelist` (a text file naming the images), prepared into train and val with no labels and no test split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from selfsup.config import DataConfig
from selfsup.data.arrays import load_split
from selfsup.data.sources import UNLABELLED, prepare_dataset, random_split
from selfsup.errors import ConfigError, DatasetError
from selfsup.params import load_params

# A nested tree with no class structure: files at every depth, a non-image beside them.
TREE = ["a.png", "2024/jan/b.png", "2024/jan/c.jpg", "2024/feb/deep/d.png", "misc/e.png", "misc/f.webp"]


def make_tree(root: Path, names: list[str] = TREE, size: int = 12) -> dict[str, int]:
    """One image per name, each a flat grey whose level says which it is; returns name -> level."""
    levels = {}
    for index, name in enumerate(names):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        level = 20 + 30 * index
        quality = {"quality": 100} if path.suffix == ".jpg" else {}
        Image.new("RGB", (size, size), (level, level, level)).save(path, **quality)
        levels[name] = level
    (root / "notes.txt").write_text("not an image")
    return levels


def levels_of(images: np.ndarray) -> set[int]:
    return {int(round(image.mean())) for image in images}


def test_a_nested_folder_is_read_whole_without_labels(tmp_path: Path) -> None:
    levels = make_tree(tmp_path / "images")
    out = tmp_path / "prepared"
    manifest = prepare_dataset(DataConfig(source="folder", root=str(tmp_path / "images"), image_size=8), out)
    assert not manifest.labelled and manifest.class_names == []
    assert set(manifest.splits) == {"train", "val"}  # no labels, so nothing to test on
    train, val = load_split(out, "train"), load_split(out, "val")
    assert len(train.images) + len(val.images) == len(TREE) and len(val.images) == 1  # 10% of 6, at least one
    assert (train.labels == UNLABELLED).all() and (val.labels == UNLABELLED).all()
    assert train.images.shape[1:] == (8, 8, 3)
    found = levels_of(np.concatenate([train.images, val.images]))
    assert all(any(abs(level - seen) <= 2 for seen in found) for level in levels.values())  # every image, once


def test_several_folders_are_read_together(tmp_path: Path) -> None:
    make_tree(tmp_path / "one", TREE[:3])
    make_tree(tmp_path / "two", TREE[3:])
    config = DataConfig(source="folder", root=[str(tmp_path / "one"), str(tmp_path / "two")], image_size=8)
    manifest = prepare_dataset(config, tmp_path / "prepared")
    assert sum(split["count"] for split in manifest.splits.values()) == len(TREE)


def test_a_file_list_names_the_images_relative_to_itself(tmp_path: Path) -> None:
    make_tree(tmp_path / "images")
    listing = tmp_path / "images" / "pretrain.txt"
    listing.write_text(
        "# the ones to pretrain on\na.png\n\n2024/jan/b.png\n" + str(tmp_path / "images/misc/e.png") + "\n"
    )
    manifest = prepare_dataset(DataConfig(source="filelist", root=str(listing), image_size=8), tmp_path / "out")
    assert sum(split["count"] for split in manifest.splits.values()) == 3 and not manifest.labelled


def test_the_same_seed_holds_out_the_same_images(tmp_path: Path) -> None:
    make_tree(tmp_path / "images")
    config = DataConfig(source="folder", root=str(tmp_path / "images"), image_size=8, val_fraction=0.34)
    prepare_dataset(config, tmp_path / "a")
    prepare_dataset(config, tmp_path / "b")
    first, second = load_split(tmp_path / "a", "val").images, load_split(tmp_path / "b", "val").images
    np.testing.assert_array_equal(first, second)
    train, val = random_split(100, 0.1, seed=3)
    assert len(val) == 10 and set(train) | set(val) == set(range(100)) and not set(train) & set(val)


@pytest.mark.parametrize(
    "setup, source, match",
    [
        (lambda root: None, "folder", r"data.root=.*missing is not a folder"),
        (lambda root: root.mkdir(), "folder", r"empty holds no images .* in any of its folders"),
        (
            lambda root: (root / "deep").mkdir(parents=True) or (root / "deep" / "a.txt").write_text("x"),
            "folder",
            r"holds no images",
        ),
        (lambda root: None, "filelist", r"is not a file: point it at a text file naming one image per line"),
    ],
    ids=["missing folder", "empty folder", "no images in it", "missing list"],
)
def test_bad_folders_and_lists_are_one_line_naming_the_fix(tmp_path: Path, setup, source: str, match: str) -> None:
    root = tmp_path / ("missing" if "missing" in match or source == "filelist" else "empty")
    setup(root)
    with pytest.raises(DatasetError, match=match):
        prepare_dataset(DataConfig(source=source, root=str(root)), tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written


def test_a_list_naming_missing_files_says_which(tmp_path: Path) -> None:
    make_tree(tmp_path / "images", TREE[:2])
    listing = tmp_path / "images" / "list.txt"
    listing.write_text("a.png\ngone1.png\ngone2.png\n")
    with pytest.raises(DatasetError, match=r"2 of the 3 files .*list.txt names do not exist: .*gone1.png, .*gone2.png"):
        prepare_dataset(DataConfig(source="filelist", root=str(listing)), tmp_path / "out")


def test_a_corrupt_image_among_good_ones_is_skipped_and_named(tmp_path: Path, capsys) -> None:
    make_tree(tmp_path / "images")
    (tmp_path / "images" / "2024" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    config = DataConfig(source="folder", root=str(tmp_path / "images"), image_size=8, max_unreadable_fraction=0.2)
    manifest = prepare_dataset(config, tmp_path / "out")
    assert sum(split["count"] for split in manifest.splits.values()) == len(TREE)
    warning = capsys.readouterr().err
    assert "skipped 1 of 7 image files" in warning and "broken.jpg" in warning


def test_params_refuse_a_list_for_other_sources_and_an_unlabelled_transfer_target() -> None:
    with pytest.raises(ConfigError, match="data.root is a list, which only data.source=folder reads"):
        load_params({"data": {"source": "imagefolder", "root": ["a", "b"]}})
    with pytest.raises(
        ConfigError, match="eval.transfer.source=.folder. is invalid: folder has no labels, which eval.transfer"
    ):
        load_params({"eval": {"transfer": {"source": "folder", "root": "x"}}})
    unlabelled = {"data": {"source": "folder", "root": ["a", "b"]}}
    with pytest.raises(
        ConfigError,
        match="champion_metric=knn_k20_top1 needs labelled evaluation data: data.source=folder has no labels and "
        "eval.data is not set; set eval.data to a labelled dataset, or mlflow.champion_metric: rankme",
    ):
        load_params(unlabelled)
    assert load_params({**unlabelled, "mlflow": {"champion_metric": "rankme"}}).data.root == ["a", "b"]


@pytest.mark.parametrize("layout", ["photos", "train/photos", "split"], ids=["one folder", "train only", "train+test"])
def test_labelled_data_of_one_class_points_to_the_unlabelled_source(tmp_path: Path, layout: str) -> None:
    """`root/photos/*.jpg` (or its train/test split) is one class to imagefolder: every evaluation would score 100%."""
    for part in ["train/photos", "test/photos"] if layout == "split" else [layout]:
        make_tree(tmp_path / "images" / part)
    with pytest.raises(
        DatasetError, match=r"has one class \((photos|train)\): for images without labels set data.source: f"
    ):
        prepare_dataset(DataConfig(source="imagefolder", root=str(tmp_path / "images")), tmp_path / "out")
    assert not (tmp_path / "out").exists()
