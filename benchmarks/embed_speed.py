"""Embedding a collection: `pipelines.embed`'s Ray Data pipeline (decoding in tasks, the model in an actor) against a
plain loop in one process (decode, resize, `predict`, batch after batch), on the same files and the same registered
model, side by side in one run.

The model is an encoder registered for the purpose (random weights: the speed does not depend on them) in a
temporary MLflow store; the files are CIFAR-10's training JPEGs from ../shared (or the digits, written as PNGs).
Both sides are timed after a warm-up (Ray started, the model loaded once); Ray Data's figure includes starting its
actor pool, loading the model in it, and writing the shards.

    python benchmarks/embed_speed.py                               # 10,000 files, small CNN and ResNet-18 (~3 min)
    python benchmarks/embed_speed.py --backbones resnet18 --actors 1 --cpus-per-actor 1
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "ssl"))  # a plain checkout works without `pip install`

import argparse  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from prepare_speed import small_files  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--backbones", nargs="+", default=["small_cnn", "resnet18"])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--cpus-per-actor", type=float, default=1.0)
    return parser.parse_args()


def register_random_encoder(root: Path, backbone: str, image_size: int) -> str:
    import torch

    from selfsup.config import MlflowConfig, ModelConfig
    from selfsup.models import Encoder, save_encoder
    from selfsup.tracking import register_encoder

    torch.manual_seed(0)
    encoder = Encoder(ModelConfig(backbone=backbone), mean=[0.5] * 3, std=[0.25] * 3, image_size=image_size)
    save_encoder(encoder, root / "encoder.pt", [image_size, image_size])
    example = np.zeros((2, image_size, image_size, 3), np.uint8)
    register_encoder(
        root / "encoder.pt",
        MlflowConfig(model_name=backbone),
        root,
        params={},
        metrics={"rankme": 1.0},
        champion_metric="rankme",
        lineage={"dataset_sha256": "0" * 64},
        example=example,
        feature_dim=encoder.feature_dim,
    )
    return f"models:/{backbone}@champion"


def plain_loop(model, paths: list[str], size: int, batch_size: int) -> float:
    """images/s of decode + resize + predict, a batch at a time, in this process (torch on every core)."""
    from selfsup.data.sources import _decode_image, center_crop_resize

    started = time.perf_counter()
    for start in range(0, len(paths), batch_size):
        images = [
            center_crop_resize(_decode_image(path, 10**9), size).permute(1, 2, 0).numpy()
            for path in paths[start : start + batch_size]
        ]
        model.predict(np.stack(images))
    return len(paths) / (time.perf_counter() - started)


def main() -> None:
    args = parse_args()
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    import mlflow

    from selfsup.embedding import EmbedJob, embed_collection
    from selfsup.ray_cluster import connect_ray

    rows = []
    with tempfile.TemporaryDirectory(prefix="embed-speed-") as tmp:
        folder = Path(tmp) / "images"
        files = small_files(args.images, Path(tmp) / "written")
        folder.mkdir()
        for index, path in enumerate(files):  # one folder of links: the command's listing finds exactly these
            (folder / f"{index:06d}{Path(path).suffix}").symlink_to(Path(path).resolve())
        paths = sorted(str(p) for p in folder.iterdir())
        warm = Path(tmp) / "warm"
        warm.mkdir()
        for path in paths[: args.batch_size]:
            (warm / Path(path).name).symlink_to(path)
        connect_ray(streaming=True)
        for backbone in args.backbones:
            root = Path(tmp) / backbone
            root.mkdir()
            os.environ.pop("MLFLOW_TRACKING_URI", None)  # set_tracking_uri below sets it: register in this root
            uri = register_random_encoder(root, backbone, args.image_size)
            tracking = f"sqlite:///{root / 'mlflow.db'}"
            mlflow.set_tracking_uri(tracking)
            model = mlflow.pyfunc.load_model(uri)
            plain_loop(model, paths[: args.batch_size], args.image_size, args.batch_size)  # warm-up
            alone = plain_loop(model, paths, args.image_size, args.batch_size)

            def job(images: Path, out: str) -> EmbedJob:
                return EmbedJob(
                    uri,
                    str(images),
                    root / out,
                    tracking,
                    batch_size=args.batch_size,
                    actors=args.actors,
                    cpus_per_actor=args.cpus_per_actor,
                    images_per_shard=2048,
                )

            embed_collection(job(warm, "warm-up"))  # Ray Data's workers import what they need
            started = time.perf_counter()
            report = embed_collection(job(folder, "timed"))
            spread = report.embedded / (time.perf_counter() - started)
            rows.append((backbone, len(paths), alone, spread))
            print(f"{backbone}: plain loop {alone:,.0f} images/s, Ray Data {spread:,.0f} images/s", flush=True)
    print(
        f"\n{os.cpu_count()} CPU cores, {args.image_size} px, batch {args.batch_size}, {args.actors} actor(s) of "
        f"{args.cpus_per_actor:g} CPU\n"
    )
    print("| model | images | plain loop (images/s) | Ray Data (images/s) | ratio |")
    print("|---|---:|---:|---:|---:|")
    for backbone, count, alone, spread in rows:
        print(f"| {backbone} | {count:,} | {alone:,.0f} | {spread:,.0f} | {spread / alone:.2f}x |")


if __name__ == "__main__":
    main()
