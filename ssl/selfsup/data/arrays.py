"""The prepared dataset on disk: one array file per split and a manifest that describes them.

A split file is an uncompressed `.npz` with `images` (uint8, N x H x W x 3) and `labels` (int64, N).
Labels sit beside the images but pretraining reads only `images`. A source without labels (folder, filelist)
has no class names, every label -1, and no test split.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from selfsup.errors import DatasetError

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8, N x H x W x 3
    labels: np.ndarray  # int64, N

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise DatasetError(f"images must be uint8 N x H x W x 3, got {self.images.dtype} {self.images.shape}")
        if self.labels.shape != (len(self.images),):
            raise DatasetError(f"{len(self.labels)} labels for {len(self.images)} images")


@dataclass
class Manifest:
    source: str
    image_size: list[int]  # [H, W]
    class_names: list[str]
    splits: dict[str, dict] = field(default_factory=dict)  # name -> {file, count, sha256}
    mean: list[float] = field(default_factory=list)  # per channel, of train, in [0, 1]
    std: list[float] = field(default_factory=list)
    sha256: str = ""  # of all split files together: the dataset's identity in lineage tags

    @classmethod
    def read(cls, folder: str | Path) -> Manifest:
        path = Path(folder) / MANIFEST
        if not path.is_file():
            raise DatasetError(f"no prepared dataset at {path}: run `dvc repro prepare` first")
        try:
            return cls(**json.loads(path.read_text()))
        except (ValueError, TypeError) as error:  # not JSON, or written by another version
            raise DatasetError(f"{path} is unreadable ({error}): re-run `dvc repro -f prepare`") from None

    @property
    def labelled(self) -> bool:
        return bool(self.class_names)

    @property
    def streamed(self) -> bool:
        """Whether the training images are Parquet shards that pretraining streams (selfsup.data.shards)."""
        return "shards" in self.splits.get("train", {})

    def shards(self, folder: str | Path) -> tuple[str, list[str]]:
        """The training shards' URI (a relative one is inside `folder`) and their file names."""
        train = self.splits["train"]
        uri = train["shards"]
        if "://" not in uri and not Path(uri).is_absolute():
            uri = str((Path(folder) / uri).resolve())
        return uri, train["files"]

    def split_path(self, folder: str | Path, split: str) -> Path:
        if split not in self.splits:
            raise DatasetError(f"split {split!r} not in the prepared dataset ({', '.join(self.splits)})")
        if "file" not in self.splits[split]:
            raise DatasetError(
                f"the {split} split of {folder} is streamed from shards ({self.splits[split]['shards']}), not held "
                "in memory: read it with selfsup.data.shards"
            )
        return Path(folder) / self.splits[split]["file"]


def write_dataset(folder: str | Path, source: str, splits: dict[str, Split], class_names: list[str]) -> Manifest:
    """Write each split and the manifest; files appear whole or not at all."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    train = splits["train"].images
    mean, std = _channel_mean_std(train)
    manifest = Manifest(source=source, image_size=list(train.shape[1:3]), class_names=class_names, mean=mean, std=std)
    for name, split in splits.items():
        manifest.splits[name] = _write_split(folder, name, split)
    return _write_manifest(folder, manifest)


def write_streamed_dataset(
    folder: str | Path, source: str, val: Split, train: dict, mean: list[float], std: list[float]
) -> Manifest:
    """The manifest of a dataset whose training images are shards (`train`: count, sha256, shards, files), and its
    validation split, held in memory as a prepared split is."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(source=source, image_size=list(val.images.shape[1:3]), class_names=[], mean=mean, std=std)
    manifest.splits = {"train": train, "val": _write_split(folder, "val", val)}
    return _write_manifest(folder, manifest)


def _write_split(folder: Path, name: str, split: Split) -> dict:
    path = folder / f"{name}.npz"
    _atomic_write(path, lambda f: np.savez(f, images=split.images, labels=split.labels))
    return {"file": path.name, "count": len(split.labels), "sha256": file_sha256(path)}


def _write_manifest(folder: Path, manifest: Manifest) -> Manifest:
    """The dataset's identity (a hash of its splits' hashes), then the manifest, written last and whole."""
    manifest.sha256 = hashlib.sha256(
        "".join(manifest.splits[n]["sha256"] for n in sorted(manifest.splits)).encode()
    ).hexdigest()
    _atomic_write(folder / MANIFEST, lambda f: f.write(json.dumps(asdict(manifest), indent=2).encode()))
    return manifest


def load_split(folder: str | Path, split: str, with_labels: bool = True) -> Split | np.ndarray:
    """Load one prepared split; `with_labels=False` returns the images alone (what pretraining sees)."""
    manifest = Manifest.read(folder)
    path = manifest.split_path(folder, split)
    try:
        with np.load(path) as arrays:
            images = arrays["images"]
            labels = arrays["labels"] if with_labels else None
    except (OSError, ValueError, KeyError) as error:
        raise DatasetError(f"cannot read {path} ({error}): re-run `dvc repro -f prepare`") from None
    return Split(images, labels) if with_labels else images


def load_labels(folder: str | Path, split: str) -> np.ndarray:
    """One prepared split's labels alone, without reading its images."""
    path = Manifest.read(folder).split_path(folder, split)
    try:
        with np.load(path) as arrays:
            return arrays["labels"]
    except (OSError, ValueError, KeyError) as error:
        raise DatasetError(f"cannot read {path} ({error}): re-run `dvc repro -f prepare`") from None


def _channel_mean_std(images: np.ndarray, chunk: int = 8192) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1], in chunks: a float copy of a whole large dataset won't fit."""
    moments = ChannelMoments()
    for start in range(0, len(images), chunk):
        moments.add(images[start : start + chunk])
    return moments.mean_std()


class ChannelMoments:
    """Per-channel sums of the pixels in [0, 1] and of their squares, added image by image or in batches of uint8
    ... x 3 images; their mean and std at the end (the arrays' and the shards' normalisation alike)."""

    def __init__(self) -> None:
        self.total, self.squares, self.count = np.zeros(3), np.zeros(3), 0

    def add(self, images: np.ndarray) -> None:
        self.add_sums(*pixel_sums(images))

    def add_sums(self, total: np.ndarray, squares: np.ndarray, count: int) -> None:
        """What `pixel_sums` computed elsewhere (in a Ray Data task): the same figures as `add` of those images."""
        self.total += total
        self.squares += squares
        self.count += count

    def mean_std(self) -> tuple[list[float], list[float]]:
        mean = self.total / self.count
        std = np.sqrt(np.maximum(self.squares / self.count - mean**2, 0))
        return mean.round(6).tolist(), std.round(6).tolist()


def pixel_sums(images: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-channel sums of uint8 ... x 3 images' pixels in [0, 1] and of their squares, and the number of pixels."""
    pixels = images.reshape(-1, 3).astype(np.float64) / 255.0
    return pixels.sum(0), (pixels**2).sum(0), len(pixels)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _atomic_write(path: Path, write) -> None:
    temporary = path.with_name(path.name + ".partial")
    with open(temporary, "wb") as f:
        write(f)
    os.replace(temporary, path)
