"""prepare_dataset: each source to uint8 arrays + manifest, and a clear DatasetError for each bad input."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from selfsup.config import DataConfig
from selfsup.data.arrays import MANIFEST, Manifest, file_sha256, load_split
from selfsup.data.sources import prepare_dataset, stratified_split
from selfsup.errors import DatasetError
from tests.conftest import ROOT

CIFAR10 = ROOT.parent / "shared" / "datasets" / "cifar10"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# Distinct flat colours per class, so a decoded PNG's class can be read from its pixels.
COLOURS = {"apple": (200, 30, 30), "banana": (230, 220, 40), "cherry": (120, 10, 60)}


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_manifest(out: Path, manifest: Manifest) -> None:
    """The manifest on disk is the one returned, and its hashes are those of the files."""
    on_disk = json.loads((out / MANIFEST).read_text())
    assert on_disk["sha256"] == manifest.sha256
    assert Manifest.read(out) == manifest
    assert set(manifest.splits) == {"train", "val", "test"}
    for name, info in manifest.splits.items():
        path = out / info["file"]
        assert path.is_file()
        assert info["sha256"] == sha256_of(path) == file_sha256(path)
        split = load_split(out, name)
        assert info["count"] == len(split.labels) == len(split.images)
        assert split.images.dtype == np.uint8 and split.labels.dtype == np.int64
    combined = "".join(manifest.splits[n]["sha256"] for n in sorted(manifest.splits))
    assert manifest.sha256 == hashlib.sha256(combined.encode()).hexdigest()
    assert not list(out.glob("*.partial"))  # atomic writes leave no temporaries


# --- digits --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits16(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Manifest]:
    out = tmp_path_factory.mktemp("digits16")
    return out, prepare_dataset(DataConfig(source="digits", image_size=16, seed=0), out)


def test_digits_counts_shapes_and_labels(digits16: tuple[Path, Manifest]) -> None:
    out, manifest = digits16
    train, val, test = (load_split(out, s) for s in ("train", "val", "test"))
    assert len(train.labels) + len(val.labels) + len(test.labels) == 1797
    assert sum(manifest.splits[s]["count"] for s in ("train", "val", "test")) == 1797
    assert len(test.labels) == pytest.approx(0.2 * 1797, abs=10)
    for split in (train, test):
        assert split.images.shape[1:] == (16, 16, 3)
        assert split.images.dtype == np.uint8
        assert split.labels.dtype == np.int64
        assert set(split.labels.tolist()) == set(range(10))
        # Grey digits made RGB: the three channels are equal.
        assert np.array_equal(split.images[..., 0], split.images[..., 1])
        assert np.array_equal(split.images[..., 1], split.images[..., 2])
    assert train.images.max() > 200 and train.images.min() == 0  # 0..16 scaled to the full 0..255 range
    assert manifest.source == "digits"
    assert manifest.image_size == [16, 16]
    assert manifest.class_names == [str(i) for i in range(10)]
    assert len(manifest.mean) == 3 and len(manifest.std) == 3
    expected_mean = train.images.reshape(-1, 3).mean(0) / 255
    assert np.allclose(manifest.mean, expected_mean, atol=1e-5)
    check_manifest(out, manifest)


def test_digits_split_is_stratified(digits16: tuple[Path, Manifest]) -> None:
    out, _ = digits16
    train, val, test = (load_split(out, s) for s in ("train", "val", "test"))
    for label in range(10):
        in_train, in_val, in_test = (int((split.labels == label).sum()) for split in (train, val, test))
        assert in_test == max(1, round((in_train + in_val + in_test) * 0.2))
        assert in_val == max(1, round((in_train + in_val) * 0.1))  # then val out of what test left


def test_digits_native_size_is_8x8(tmp_path: Path) -> None:
    manifest = prepare_dataset(DataConfig(source="digits", image_size=None), tmp_path)
    assert manifest.image_size == [8, 8]
    assert load_split(tmp_path, "train", with_labels=False).shape[1:] == (8, 8, 3)


def test_digits_split_is_deterministic_per_seed(tmp_path: Path, digits16: tuple[Path, Manifest]) -> None:
    _, first = digits16
    again = prepare_dataset(DataConfig(source="digits", image_size=16, seed=0), tmp_path / "again")
    assert again.sha256 == first.sha256
    assert again.splits == first.splits
    other = prepare_dataset(DataConfig(source="digits", image_size=16, seed=1), tmp_path / "other")
    assert other.sha256 != first.sha256
    assert other.splits["test"]["count"] == first.splits["test"]["count"]  # same sizes, other members


def test_stratified_split_partitions_the_indices() -> None:
    labels = np.repeat(np.arange(4), [10, 5, 1, 7])
    train, test = stratified_split(labels, 0.2, seed=3)
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(len(labels)))
    assert not set(train.tolist()) & set(test.tolist())
    assert [int((labels[test] == c).sum()) for c in range(4)] == [2, 1, 0, 1]  # a single image stays in train
    again_train, again_test = stratified_split(labels, 0.2, seed=3)
    assert np.array_equal(train, again_train) and np.array_equal(test, again_test)


# --- imagefolder ---------------------------------------------------------------------------------


def write_class_images(folder: Path, per_class: int = 6, size: int = 12, fmt: str = "png") -> None:
    for name, colour in COLOURS.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", (size, size), colour).save(folder / name / f"{i:03d}.{fmt}")


def test_imagefolder_class_folders_split_by_fraction(tmp_path: Path) -> None:
    root = tmp_path / "images"
    write_class_images(root)
    out = tmp_path / "prepared"
    manifest = prepare_dataset(
        DataConfig(source="imagefolder", root=str(root), test_fraction=0.5, image_size=None), out
    )
    assert manifest.class_names == sorted(COLOURS)
    assert manifest.image_size == [12, 12]
    assert manifest.splits["train"]["count"] + manifest.splits["val"]["count"] == manifest.splits["test"]["count"] == 9
    for name, per_class in (("train", 2), ("val", 1), ("test", 3)):  # val: at least one image per class
        split = load_split(out, name)
        assert split.images.shape == (3 * per_class, 12, 12, 3)
        assert np.bincount(split.labels).tolist() == [per_class] * 3
        for image, label in zip(split.images, split.labels):
            assert tuple(image[0, 0]) == COLOURS[manifest.class_names[label]]  # PNG is lossless
    check_manifest(out, manifest)


def test_imagefolder_train_and_test_folders(tmp_path: Path) -> None:
    root = tmp_path / "images"
    write_class_images(root / "train", per_class=5, fmt="png")
    write_class_images(root / "test", per_class=2, fmt="jpg")
    out = tmp_path / "prepared"
    manifest = prepare_dataset(
        DataConfig(source="imagefolder", root=str(root), test_fraction=0.5, image_size=None), out
    )
    assert manifest.class_names == sorted(COLOURS)
    assert manifest.splits["train"]["count"] + manifest.splits["val"]["count"] == 15
    assert manifest.splits["test"]["count"] == 6  # given as is, test_fraction unused
    test = load_split(out, "test")
    assert np.bincount(test.labels).tolist() == [2, 2, 2]
    for image, label in zip(test.images, test.labels):
        expected = np.array(COLOURS[manifest.class_names[label]])
        assert np.abs(image.astype(int) - expected).max() <= 8  # JPEG: close, not exact
    check_manifest(out, manifest)


def test_imagefolder_test_classes_must_match_train(tmp_path: Path) -> None:
    root = tmp_path / "images"
    write_class_images(root / "train", per_class=2)
    write_class_images(root / "test", per_class=2)
    for path in (root / "test" / "cherry").iterdir():
        path.unlink()
    (root / "test" / "cherry").rmdir()
    with pytest.raises(DatasetError, match="cherry"):
        prepare_dataset(DataConfig(source="imagefolder", root=str(root), image_size=None), tmp_path / "out")


def test_imagefolder_resizes_to_image_size(tmp_path: Path) -> None:
    root = tmp_path / "images"
    write_class_images(root, per_class=4, size=20)
    manifest = prepare_dataset(DataConfig(source="imagefolder", root=str(root), image_size=8), tmp_path / "out")
    assert manifest.image_size == [8, 8]
    assert load_split(tmp_path / "out", "train").images.shape[1:] == (8, 8, 3)


def test_missing_root_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_folder"
    with pytest.raises(DatasetError) as caught:
        prepare_dataset(DataConfig(source="imagefolder", root=str(missing), image_size=None), tmp_path / "out")
    assert str(missing) in str(caught.value)
    assert "data.root" in str(caught.value)
    assert not (tmp_path / "out" / MANIFEST).exists()


def test_empty_folder_is_a_dataset_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no class subfolders"):
        prepare_dataset(DataConfig(source="imagefolder", root=str(tmp_path / "empty")), tmp_path / "out")


def test_class_folder_without_images_is_a_dataset_error(tmp_path: Path) -> None:
    root = tmp_path / "images"
    write_class_images(root, per_class=2)
    (root / "durian").mkdir()
    (root / "durian" / "notes.txt").write_text("no images here")
    with pytest.raises(DatasetError) as caught:
        prepare_dataset(DataConfig(source="imagefolder", root=str(root), image_size=None), tmp_path / "out")
    assert str(root / "durian") in str(caught.value)


@pytest.mark.parametrize(
    "name, content",
    [("broken.png", b"this is not an image"), ("truncated.jpg", None)],
    ids=["garbage", "truncated-jpeg"],
)
def test_corrupt_image_names_the_file(tmp_path: Path, name: str, content: bytes | None) -> None:
    root = tmp_path / "images"
    write_class_images(root, per_class=3)
    bad = root / "banana" / name
    if content is None:  # the first bytes of a real JPEG
        Image.new("RGB", (12, 12), (1, 2, 3)).save(bad)
        content = bad.read_bytes()[:80]
    bad.write_bytes(content)
    with pytest.raises(DatasetError) as caught:
        prepare_dataset(DataConfig(source="imagefolder", root=str(root), image_size=None), tmp_path / "out")
    assert str(bad) in str(caught.value)
    assert not (tmp_path / "out" / MANIFEST).exists()


def test_empty_image_file_is_a_dataset_error(tmp_path: Path) -> None:
    root = tmp_path / "images"
    write_class_images(root, per_class=3)
    empty = root / "apple" / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(DatasetError) as caught:
        prepare_dataset(DataConfig(source="imagefolder", root=str(root), image_size=None), tmp_path / "out")
    assert str(empty) in str(caught.value)


def test_mixed_sizes_need_image_size(tmp_path: Path) -> None:
    root = tmp_path / "images"
    write_class_images(root, per_class=3, size=12)
    Image.new("RGB", (16, 10), COLOURS["cherry"]).save(root / "cherry" / "wide.png")
    with pytest.raises(DatasetError) as caught:
        prepare_dataset(DataConfig(source="imagefolder", root=str(root), image_size=None), tmp_path / "out")
    assert "data.image_size" in str(caught.value)
    assert "wide.png" in str(caught.value)
    manifest = prepare_dataset(DataConfig(source="imagefolder", root=str(root), image_size=10), tmp_path / "out")
    assert manifest.image_size == [10, 10]
    images = np.concatenate([load_split(tmp_path / "out", s).images for s in ("train", "val", "test")])
    assert images.shape == (10, 10, 10, 3)


def test_cifar10_missing_without_download_names_the_fix(tmp_path: Path) -> None:
    (tmp_path / "cifar").mkdir()
    with pytest.raises(DatasetError) as caught:
        prepare_dataset(DataConfig(source="cifar10", root=str(tmp_path / "cifar"), download=False), tmp_path / "out")
    message = str(caught.value)
    assert "data.download" in message
    assert str(tmp_path / "cifar") in message


# --- the real CIFAR-10 ImageFolder ----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR10.is_dir(), reason=f"no CIFAR-10 ImageFolder at {CIFAR10}")
def test_cifar10_imagefolder(tmp_path: Path) -> None:
    manifest = prepare_dataset(DataConfig(source="imagefolder", root=str(CIFAR10), image_size=None), tmp_path)
    assert manifest.class_names == CIFAR10_CLASSES
    assert manifest.splits["train"]["count"] == 45000 and manifest.splits["val"]["count"] == 5000
    assert manifest.splits["test"]["count"] == 10000
    assert manifest.image_size == [32, 32]
    assert manifest.mean == pytest.approx([0.4913, 0.4821, 0.4465], abs=0.002)
    train = load_split(tmp_path, "train")
    assert train.images.shape == (45000, 32, 32, 3)
    assert np.bincount(train.labels).tolist() == [4500] * 10
    assert np.bincount(load_split(tmp_path, "test").labels).tolist() == [1000] * 10
    check_manifest(tmp_path, manifest)


@pytest.mark.parametrize("fmt", ["bmp", "tiff", "gif"])
def test_formats_torchvision_cannot_decode_go_through_pil(tmp_path: Path, fmt: str) -> None:
    root = tmp_path / "images"
    write_class_images(root, per_class=2, fmt=fmt)
    out = tmp_path / "prepared"
    manifest = prepare_dataset(
        DataConfig(source="imagefolder", root=str(root), test_fraction=0.5, image_size=None), out
    )
    split = load_split(out, "train")
    assert split.images.shape == (3, 12, 12, 3)
    for image, label in zip(split.images, split.labels):
        assert tuple(image[0, 0]) == COLOURS[manifest.class_names[label]]  # all three formats are lossless here


def test_animated_gif_keeps_its_first_frame(tmp_path: Path) -> None:
    root = tmp_path / "images"
    write_class_images(root, per_class=2)
    frames = [Image.new("RGB", (12, 12), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(root / "apple" / "animated.gif", save_all=True, append_images=frames[1:])
    out = tmp_path / "prepared"
    prepare_dataset(DataConfig(source="imagefolder", root=str(root), test_fraction=0.5, image_size=None), out)
    images = np.concatenate([load_split(out, s).images for s in ("train", "test")])
    assert len(images) == 7 and {tuple(i[0, 0]) for i in images} >= {(255, 0, 0)}
