"""Parquet shards against WebDataset tars for the streamed training images: size on disk, time to write, and
Ray Data's images/s over a whole pass (read, decode, hand over in batches), the same images side by side in one run.

The same JPEGs (quality 95, as prepare writes them) in the same number of shards, read on a private Ray instance:
- parquet: selfsup's reader (`read_streamed`: a task per shard reads it with pyarrow and decodes in batches);
- webdataset, batch decode: `ray.data.read_webdataset(decoder=None)`, then the same batched decode;
- webdataset, its decoder: `read_webdataset`'s default, which decodes each file by its suffix with Pillow.
Each is timed over two passes after a warm-up pass (the files in the page cache, as on a node that streams the
same shards every epoch), consuming batches of 256 images as a training worker would.

    python benchmarks/shard_formats.py                    # CIFAR-10's 50,000 training images at 32 and 96 px (~6 min)
    python benchmarks/shard_formats.py --source digits    # the embedded digits, seconds, without ../shared
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "ssl"))  # a plain checkout works without `pip install`

import argparse  # noqa: E402
import io  # noqa: E402
import tarfile  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from selfsup.data.shards import ShardWriter, decode_batch, encode_jpeg, read_streamed  # noqa: E402
from selfsup.data.sources import read_image_folder, resize_square  # noqa: E402

CIFAR10 = REPO.parent / "shared" / "datasets" / "cifar10" / "train"
BATCH = 256


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", choices=["cifar10", "digits"], default="cifar10")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 96])
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--passes", type=int, default=2)
    return parser.parse_args()


def source_images(source: str) -> np.ndarray:
    if source == "digits":
        from sklearn.datasets import load_digits

        gray = np.round(load_digits().images * (255 / 16)).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    if not CIFAR10.is_dir():
        sys.exit(f"no CIFAR-10 at {CIFAR10}; run with --source digits")
    return read_image_folder(CIFAR10, None)[0].images


def write_parquet(images: np.ndarray, folder: Path, shards: int) -> list[str]:
    writer = ShardWriter(f"file://{folder}", images_per_shard=-(-len(images) // shards))
    for image in images:
        writer.add(image)
    writer.close()
    return writer.files


def write_webdataset(images: np.ndarray, folder: Path, shards: int) -> list[str]:
    folder.mkdir(parents=True)
    per_shard = -(-len(images) // shards)
    files = []
    for shard, start in enumerate(range(0, len(images), per_shard)):
        name = f"train-{shard:05d}.tar"
        with tarfile.open(folder / name, "w") as tar:
            for index in range(start, min(start + per_shard, len(images))):
                data = encode_jpeg(images[index])
                member = tarfile.TarInfo(f"{index:08d}.jpg")
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
        files.append(name)
    return files


def webdataset_rows_to_images(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """read_webdataset's rows (`__key__`, `jpg` bytes) decoded as selfsup's reader decodes its shards."""
    index = np.array([int(key) for key in batch["__key__"]], dtype=np.int64)
    return decode_batch({"image": batch["jpg"], "index": index, "label": np.full(len(index), -1)})


def images_per_s(make_dataset, count: int, passes: int) -> tuple[float, float]:
    """(images/s over `passes` whole passes after a warm-up pass, seconds to the warm-up's first batch)."""
    started = time.perf_counter()
    first = None
    seen = 0
    for batch in make_dataset().iter_batches(batch_size=BATCH, batch_format="numpy"):
        first = first or time.perf_counter() - started
        seen += len(batch["__key__" if "__key__" in batch else "index"])
    assert seen == count, f"the warm-up pass saw {seen} of {count} images"
    started = time.perf_counter()
    for _ in range(passes):
        batches = make_dataset().iter_batches(batch_size=BATCH, batch_format="numpy")
        seen = sum(len(batch["__key__" if "__key__" in batch else "index"]) for batch in batches)
        assert seen == count, f"a pass saw {seen} of {count} images"
    return passes * count / (time.perf_counter() - started), first


def folder_mib(folder: Path) -> float:
    return sum(path.stat().st_size for path in folder.iterdir()) / 2**20


def main() -> None:
    args = parse_args()
    import ray
    import ray.data

    from selfsup.ray_cluster import connect_ray, quiet_ordered_ray_data

    originals = source_images(args.source)
    connect_ray(streaming=True)  # a private instance, as a streaming run starts it
    quiet_ordered_ray_data()
    rows = []
    for size in args.sizes:
        images = resize_square(originals, size) if size != originals.shape[1] else originals
        with tempfile.TemporaryDirectory() as tmp:
            parquet, tars = Path(tmp) / "parquet", Path(tmp) / "webdataset"
            started = time.perf_counter()
            parquet_files = write_parquet(images, parquet, args.shards)
            parquet_write = time.perf_counter() - started
            started = time.perf_counter()
            tar_files = write_webdataset(images, tars, args.shards)
            tar_write = time.perf_counter() - started
            tar_paths = [str(tars / name) for name in tar_files]
            readers = {
                "parquet (selfsup)": lambda: read_streamed(f"file://{parquet}", parquet_files, 0, size),
                "webdataset, batch decode": lambda: ray.data.read_webdataset(tar_paths, decoder=None).map_batches(
                    webdataset_rows_to_images, batch_format="numpy"
                ),
                "webdataset, its decoder": lambda: ray.data.read_webdataset(tar_paths),
            }
            for name, make in readers.items():
                rate, first = images_per_s(make, len(images), args.passes)
                on_disk = folder_mib(parquet if name.startswith("parquet") else tars)
                write = parquet_write if name.startswith("parquet") else tar_write
                rows.append((size, name, on_disk, write, rate, first))
                print(
                    f"{size} px  {name:26s} {on_disk:7.1f} MiB  write {write:5.1f} s  {rate:8,.0f} images/s  "
                    f"first batch {first:4.1f} s",
                    flush=True,
                )
    ray.shutdown()
    print(f"\n{len(originals):,} images ({args.source}), {args.shards} shards, {args.passes} timed passes\n")
    print("| size | reader | on disk (MiB) | write (s) | images/s | first batch (s) |")
    print("|---|---|---:|---:|---:|---:|")
    for size, name, on_disk, write, rate, first in rows:
        print(f"| {size} px | {name} | {on_disk:.1f} | {write:.1f} | {rate:,.0f} | {first:.1f} |")


if __name__ == "__main__":
    main()
