"""Embedding a whole image collection with a registered encoder, on Ray Data.

Ray Data tasks read, decode and resize the images (as `prepare` does a folder: centre crop, the model's size),
an actor pool runs the registered model's own `predict` (on CPUs or GPUs), and this process writes what comes
back, in the listing's order, as Parquet shards of (path, embedding, model, version).

The shards are fixed by the sorted listing: shard k holds images k*S..(k+1)*S-1, each shard written whole under
a temporary name and renamed. A re-run embeds only the shards that are not there; an output folder made by
another model version, or from another listing, is refused rather than mixed. Unreadable images are skipped,
counted, and named in the shard's metadata and in `skipped.csv`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from selfsup.config import DataConfig
from selfsup.errors import ConfigError, DatasetError, SelfsupError
from selfsup.tracking import ModelVersionRef, resolve_model

MANIFEST = "manifest.json"
SHARD_PATTERN = "embeddings-{:05d}.parquet"
DECODE_TASK_MEMORY = 128 << 20


@dataclass(frozen=True)
class EmbedJob:
    """What to embed with which model, where to, and on what."""

    model_uri: str  # models:/NAME@ALIAS or models:/NAME/VERSION
    images: str  # a folder, or a URI pyarrow lists (file://, s3://, gs://)
    out: Path
    tracking_uri: str
    batch_size: int = 256  # images per call of the model
    actors: int = 1  # model replicas (each loads the model once)
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    images_per_shard: int = 10_000
    max_image_pixels: int = DataConfig().max_image_pixels


@dataclass
class EmbedReport:
    model: str
    version: str
    images: int  # listed
    embedded: int  # in the shards, this run's and earlier runs'
    skipped: int
    shards: int
    shards_written: int  # by this run
    images_per_s: float  # this run's
    dim: int
    files: list[str] = field(default_factory=list)


class EmbedError(SelfsupError):
    """An output folder that belongs to another model version or listing."""


def embed_collection(job: EmbedJob) -> EmbedReport:
    """Embed every image of `job.images` into Parquet shards under `job.out`; see the module's docstring."""
    paths = list_images(job.images)  # before the model and Ray: a wrong folder fails in a second
    model = resolve_model(job.model_uri, job.tracking_uri)
    listing = hashlib.sha256("\n".join(paths).encode()).hexdigest()
    shards = -(-len(paths) // job.images_per_shard)
    manifest = {
        "model": model.name,
        "version": model.version,
        "model_uri": model.uri,
        "images": job.images,
        "listing_sha256": listing,
        "count": len(paths),
        "images_per_shard": job.images_per_shard,
        "files": [SHARD_PATTERN.format(k) for k in range(shards)],
    }
    _claim_output(job.out, manifest)
    todo = [k for k in range(shards) if not (job.out / SHARD_PATTERN.format(k)).is_file()]
    image_size, dim = _model_shape(model, job.tracking_uri)
    started, written = time.perf_counter(), 0
    if todo:
        written = _embed_shards(job, model, paths, todo, image_size, dim)
    elapsed = time.perf_counter() - started
    report = _summarise(job.out, manifest, dim, len(todo), written / elapsed if written else 0.0)
    (job.out / "report.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
    return report


def list_images(images: str) -> list[str]:
    """Every image file below a folder or URI (by suffix, any depth), sorted; one line when there is none."""
    from selfsup.data.sources import IMAGE_SUFFIXES, _image_files

    if "://" not in images:
        root = Path(images).expanduser()
        if not root.is_dir():
            raise DatasetError(f"--images {images} is not a folder: point it at the folder of your images")
        found = sorted(str(path.resolve()) for path in _image_files(root))
    else:
        from pyarrow import fs

        try:
            filesystem, where = fs.FileSystem.from_uri(images)
            infos = filesystem.get_file_info(fs.FileSelector(where, recursive=True))
        except (OSError, ValueError) as error:
            raise DatasetError(f"--images {images} cannot be listed ({error}): fix the URI") from None
        scheme = images.split("://")[0]
        found = sorted(
            f"{scheme}://{info.path}"
            for info in infos
            if info.type == fs.FileType.File and Path(info.path).suffix.lower() in IMAGE_SUFFIXES
        )
    if not found:
        raise DatasetError(f"--images {images} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}) at any depth")
    return found


def _claim_output(out: Path, manifest: dict) -> None:
    """Write the output's manifest, or check that the one there describes the same job."""
    path = out / MANIFEST
    if path.is_file():
        there = json.loads(path.read_text())
        for key, what in (("version", "model version"), ("listing_sha256", "listing of images")):
            if there.get(key) != manifest[key] or there.get("model") != manifest["model"]:
                raise EmbedError(
                    f"{out} holds embeddings of another {what} ({there.get('model')} version {there.get('version')} "
                    f"of {there.get('count')} images; now {manifest['model']} version {manifest['version']} of "
                    f"{manifest['count']}): use another --out, or delete it to start again"
                )
        if there.get("images_per_shard") != manifest["images_per_shard"]:
            raise EmbedError(
                f"{out} was written with --images-per-shard {there.get('images_per_shard')}: use that, or another --out"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest, indent=2) + "\n")


def _model_shape(model: ModelVersionRef, tracking_uri: str) -> tuple[int, int]:
    """The registered encoder's input side and embedding size, from the model itself (loaded once here)."""
    loaded = _load(model, tracking_uri)
    encoder_model = loaded.unwrap_python_model()
    side = encoder_model.image_size[0]
    dim = loaded.predict(np.zeros((1, side, side, 3), dtype=np.uint8)).shape[1]
    return side, dim


def _load(model: ModelVersionRef, tracking_uri: str):
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    return mlflow.pyfunc.load_model(model.uri)


class EmbedWithModel:
    """A Ray Data actor: the registered model, loaded once, embeds batches of decoded images."""

    def __init__(self, model: ModelVersionRef, tracking_uri: str, image_size: int, dim: int):
        self.model, self.side, self.dim = _load(model, tracking_uri), image_size, dim

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        readable = np.array([not error for error in batch["error"]], dtype=bool)
        embeddings = np.zeros((len(readable), self.dim), dtype=np.float32)
        if readable.any():
            raw = b"".join(batch["data"][readable])
            images = np.frombuffer(raw, dtype=np.uint8).reshape(-1, self.side, self.side, 3)
            embeddings[readable] = self.model.predict(images)
        return {"index": batch["index"], "embedding": embeddings, "error": batch["error"]}


def _embed_shards(
    job: EmbedJob, model: ModelVersionRef, paths: list[str], todo: list[int], image_size: int, dim: int
) -> int:
    """Embed the shards `todo` through Ray Data; returns the images embedded."""
    import ray.data

    from selfsup.data.sources import decoding_tasks, resize_files
    from selfsup.ray_cluster import connect_ray, quiet_ordered_ray_data

    connect_ray(streaming=True)
    cpus = ray.cluster_resources().get("CPU", 0)
    if job.actors * job.cpus_per_actor > cpus - 1:  # Ray Data would wait forever for a CPU to decode on
        raise ConfigError(
            f"--actors {job.actors} x --cpus-per-actor {job.cpus_per_actor:g} leave less than one of the cluster's "
            f"{cpus:g} CPUs to decode the images on: lower one of them"
        )
    quiet_ordered_ray_data()  # rows come back in the listing's order: shards fill in turn
    per = job.images_per_shard
    indices = [i for k in todo for i in range(k * per, min((k + 1) * per, len(paths)))]
    items = [{"index": i, "path": paths[i], "encode": False} for i in indices]
    # A decoding task holds one full-size image at a time (a 12 MP photo is 36 MB decoded): its memory request keeps
    # a node from starting more of them than it holds, and keeps Ray Data from fusing the decoding into the actors,
    # where it would wait for the model instead of running beside it.
    decoded = ray.data.from_items(items, override_num_blocks=decoding_tasks(len(items))).map_batches(
        resize_files,
        batch_size=None,
        fn_kwargs={"size": image_size, "max_pixels": job.max_image_pixels, "sums": False},
        memory=DECODE_TASK_MEMORY,
    )
    with warnings.catch_warnings():
        # max_restarts=0: a lost actor fails the run (a re-run embeds the shards not yet written). Restartable, Ray
        # logs an error-looking line for every actor (ray-project/ray#53727). Ray 2.60 deprecates passing it here
        # and offers nothing else yet.
        warnings.simplefilter("ignore", DeprecationWarning)
        embedded = decoded.map_batches(
            EmbedWithModel,
            fn_constructor_kwargs={
                "model": model,
                "tracking_uri": job.tracking_uri,
                "image_size": image_size,
                "dim": dim,
            },
            batch_size=job.batch_size,
            compute=ray.data.ActorPoolStrategy(size=job.actors),
            num_gpus=job.gpus_per_actor,
            num_cpus=job.cpus_per_actor,
            max_restarts=0,
        )
    progress = _Progress(len(items))
    rows: list[tuple[int, np.ndarray, str]] = []
    shard_of = iter(todo)
    shard = next(shard_of)
    done = 0
    for batch in embedded.iter_batches(batch_size=job.batch_size, batch_format="numpy"):
        rows += zip(batch["index"].tolist(), batch["embedding"], batch["error"].tolist())
        progress.update(len(batch["index"]))
        while shard is not None and rows and _shard_complete(rows, shard, per, len(paths)):
            end = min((shard + 1) * per, len(paths))
            count = end - shard * per
            _write_shard(job.out, shard, paths, rows[:count], model)
            done += sum(1 for _, _, error in rows[:count] if not error)
            rows = rows[count:]
            shard = next(shard_of, None)
    progress.close()
    return done


def _shard_complete(rows: list, shard: int, per: int, total: int) -> bool:
    return len(rows) >= min((shard + 1) * per, total) - shard * per


def _write_shard(out: Path, shard: int, paths: list[str], rows: list, model: ModelVersionRef) -> None:
    """One shard, whole: written under a temporary name, then renamed (an interrupted run leaves no partial one)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    kept = [(index, embedding) for index, embedding, error in rows if not error]
    skipped = [{"path": paths[index], "reason": error} for index, _, error in rows if error]
    dim = len(rows[0][1])
    embeddings = np.stack([e for _, e in kept]) if kept else np.zeros((0, dim), np.float32)
    table = pa.table(
        {
            "path": pa.array([paths[index] for index, _ in kept], pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1), pa.float32()), dim),
            "model": pa.array([model.name] * len(kept), pa.string()),
            "version": pa.array([model.version] * len(kept), pa.string()),
        }
    ).replace_schema_metadata({"skipped": json.dumps(skipped)})
    final = out / SHARD_PATTERN.format(shard)
    partial = final.with_suffix(".parquet.partial")
    pq.write_table(table, partial)
    partial.rename(final)


def _summarise(out: Path, manifest: dict, dim: int, written: int, rate: float) -> EmbedReport:
    """What the shards hold now (this run's and earlier runs'), and skipped.csv listing every unreadable image."""
    import pyarrow.parquet as pq

    embedded, skipped = 0, []
    for name in manifest["files"]:
        metadata = pq.read_metadata(out / name)
        embedded += metadata.num_rows
        skipped += json.loads((metadata.metadata or {}).get(b"skipped", b"[]"))
    with open(out / "skipped.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "reason"])
        writer.writeheader()
        writer.writerows(skipped)
    return EmbedReport(
        manifest["model"],
        manifest["version"],
        manifest["count"],
        embedded,
        len(skipped),
        len(manifest["files"]),
        written,
        round(rate, 1),
        dim,
        manifest["files"],
    )


class _Progress:
    """One line, rewritten in place on a terminal (a line every 10 s otherwise): images done and images/s."""

    def __init__(self, total: int):
        self.total, self.done, self.started, self.shown = total, 0, time.perf_counter(), 0.0
        self.tty = sys.stderr.isatty()

    def update(self, count: int) -> None:
        self.done += count
        now = time.perf_counter()
        if now - self.shown >= (0.5 if self.tty else 10.0) or self.done == self.total:
            self.shown = now
            rate = self.done / max(now - self.started, 1e-9)
            line = f"embed: {self.done:,} of {self.total:,} images ({rate:,.0f} images/s)"
            print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty:
            print(file=sys.stderr)
