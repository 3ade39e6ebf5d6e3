"""Datasets larger than memory: the training images as Parquet shards of JPEG-encoded images at the training size,
written once by `prepare` and streamed by Ray Data while pretraining.

A shard is a Parquet file of rows (index, label, image): `index` numbers the training images 0..N-1 (Exemplar-CNN's
classes), `label` is -1 (the sources that stream carry no labels), `image` the JPEG bytes. Parquet rather than
WebDataset tars: one file format for the shards and for the embeddings the encoder writes later, read by Ray Data
and pyarrow from any URI (file://, s3://, gs://), and a column of bytes that Ray Data hands over as it is (its
WebDataset reader decodes by file suffix unless told otherwise).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from selfsup.data.arrays import ChannelMoments, pixel_sums
from selfsup.errors import DatasetError


@dataclass(frozen=True)
class Shards:
    """Training images as shards: where they are, their file names, how many images they hold."""

    uri: str
    files: list[str]
    count: int


JPEG_QUALITY = 95  # the stored images differ from the decoded originals by about 1 grey level (mean absolute)
SHARD_PATTERN = "train-{:05d}.parquet"


@dataclass
class ShardWriter:
    """Encodes images and writes them as Parquet shards of `images_per_shard` rows under `uri`."""

    uri: str
    images_per_shard: int
    files: list[str] = field(default_factory=list)
    count: int = 0
    _rows: list[bytes] = field(default_factory=list)
    _moments: ChannelMoments = field(default_factory=ChannelMoments)
    _digest: hashlib._Hash = field(default_factory=hashlib.sha256)

    def __post_init__(self) -> None:
        from pyarrow import fs

        try:
            self._fs, self._root = fs.FileSystem.from_uri(self.uri)
            self._fs.create_dir(self._root, recursive=True)
        except (OSError, ValueError) as error:
            raise DatasetError(f"cannot write shards to data.shards_uri={self.uri} ({error}): fix the URI") from None

    def add(self, image: np.ndarray) -> None:
        """One uint8 H x W x 3 image."""
        self.add_encoded(encode_jpeg(image), *pixel_sums(image))

    def add_encoded(self, jpeg: bytes, total: np.ndarray, squares: np.ndarray, pixels: int) -> None:
        """One image encoded elsewhere (encode_jpeg, in a Ray Data task), with its `pixel_sums`."""
        self._moments.add_sums(total, squares, pixels)
        self._rows.append(jpeg)
        if len(self._rows) == self.images_per_shard:
            self._flush()

    def close(self) -> None:
        if self._rows:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        start = self.count
        table = pa.table(
            {
                "index": pa.array(np.arange(start, start + len(self._rows)), pa.int64()),
                "label": pa.array(np.full(len(self._rows), -1), pa.int64()),
                "image": pa.array(self._rows, pa.binary()),
            }
        )
        name = SHARD_PATTERN.format(len(self.files))
        with self._fs.open_output_stream(f"{self._root}/{name}") as stream:
            pq.write_table(table, stream, row_group_size=len(self._rows))
        for row in self._rows:
            self._digest.update(row)
        self.files.append(name)
        self.count += len(self._rows)
        self._rows = []

    def mean_std(self) -> tuple[list[float], list[float]]:
        """The written images' per-channel mean and std in [0, 1]."""
        return self._moments.mean_std()

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()


def encode_jpeg(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def decode_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ray Data's map over a batch of shard rows: the JPEG bytes -> uint8 N x H x W x 3 images (in a Ray Data task,
    on the cluster's CPUs), decoded in one call (libjpeg-turbo, ~20 us a 16 px image; one at a time costs twice
    that). A row that does not decode is dropped: prepare wrote only images it had decoded."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in batch["image"]]
    try:
        images, kept = decode_jpeg(encoded, mode=ImageReadMode.RGB), list(range(len(encoded)))
    except RuntimeError:  # one bad row fails the call: decode one by one, keeping the good ones
        images, kept = [], []
        for row, data in enumerate(encoded):
            try:
                images.append(decode_jpeg(data, mode=ImageReadMode.RGB))
                kept.append(row)
            except RuntimeError:
                continue
    return {
        "image": torch.stack(images).permute(0, 2, 3, 1).numpy() if images else np.empty((0, 0, 0, 3), np.uint8),
        "index": batch["index"][kept],
        "label": batch["label"][kept],
    }


def shard_uris(uri: str, files: Iterable[str]) -> list[str]:
    return [f"{uri.rstrip('/')}/{name}" for name in files]


def check_shards(uri: str, files: list[str]) -> None:
    """Fail in one line, before Ray starts, when the shards a manifest names are not all at `uri`."""
    from pyarrow import fs

    try:
        filesystem, root = fs.FileSystem.from_uri(uri)
        infos = filesystem.get_file_info([f"{root}/{name}" for name in files])
    except (OSError, ValueError) as error:
        raise DatasetError(f"cannot read the shards at {uri} ({error}): re-run `dvc repro prepare`") from None
    missing = [info.path for info in infos if info.type != fs.FileType.File]
    if missing:
        raise DatasetError(
            f"{len(missing)} of the {len(files)} shards are missing at {uri} (first: {missing[0]}): re-run "
            "`dvc repro -f prepare`"
        )


def read_streamed(uri: str, files: list[str], seed: int, image_size: int, decode_cpus: float = 1.0):
    """The shards as a Ray Data Dataset of decoded images, one Ray Data task reading and decoding each shard; the
    shards in a new order each pass (epoch), the same orders for the same seed.

    The order is shuffled on the list of shard paths (Ray Data's randomize_block_order waits for all of its input,
    here a few paths, not images), and the Dataset starts from that list rather than read_parquet, whose file
    listing and read planning cost seconds at the start of every pass."""
    import ray.data

    from selfsup.ray_cluster import quiet_ordered_ray_data

    quiet_ordered_ray_data()  # the order the seed gives; the loop's line per epoch not buried under Ray Data's
    paths = ray.data.from_items([{"path": path} for path in shard_uris(uri, files)], override_num_blocks=len(files))
    order = ray.data.RandomSeedConfig(seed=seed, reseed_after_execution=True)
    rows_per_block = max(1, BLOCK_BYTES // (image_size * image_size * 3))
    return paths.randomize_block_order(seed=order).map_batches(
        read_shard,
        batch_size=1,
        batch_format="numpy",
        num_cpus=decode_cpus,
        fn_kwargs={"rows_per_block": rows_per_block},
    )


# Decoded images leave a task in blocks of about this size: a whole shard of large images would be gigabytes in
# the object store at once (8,192 images of 224 px are 1.2 GB), and a block is what a worker waits for.
BLOCK_BYTES = 32 << 20


def read_shard(batch: dict[str, np.ndarray], rows_per_block: int = 1024) -> Iterator[dict[str, np.ndarray]]:
    """One shard (`batch["path"]`, a URI pyarrow reads) -> its images decoded, in blocks of `rows_per_block`."""
    import pyarrow.parquet as pq

    for path in batch["path"]:
        table = pq.read_table(path)
        for start in range(0, table.num_rows, rows_per_block):
            rows = table.slice(start, rows_per_block)
            yield decode_batch({name: rows.column(name).to_numpy(zero_copy_only=False) for name in table.column_names})
