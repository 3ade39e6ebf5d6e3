"""Pretraining images/s streamed from Parquet shards with Ray Data against the same images held in memory, side by side.

The same images (CIFAR-10's training JPEGs from ../shared, or the embedded digits), the same method, model,
batch and epochs, through the same `pretrain_with_ray` on a private Ray instance: once with the uint8 arrays in
the worker's memory, once written as shards (JPEG, quality 95) that Ray Data reads and decodes in its own tasks.
The figure is each run's images/s over the epochs after the first (which pays for starting the workers);
the streamed run's epochs include Ray Data's start of each pass.

    python benchmarks/streaming.py                        # CIFAR-10 at 16 px, small CNN, 3 epochs (~5 min on 2 cores)
    python benchmarks/streaming.py --source digits --epochs 3   # seconds, without ../shared
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "ssl"))  # a plain checkout works without `pip install`

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from selfsup.data.shards import Shards, ShardWriter  # noqa: E402
from selfsup.data.sources import read_image_folder  # noqa: E402
from selfsup.params import load_params  # noqa: E402
from selfsup.train.loop import PretrainSpec  # noqa: E402

CIFAR10 = REPO.parent / "shared" / "datasets" / "cifar10" / "train"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", choices=["cifar10", "digits"], default="cifar10")
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--method", default="simclr")
    parser.add_argument("--images-per-shard", type=int, default=8192)
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "streaming.json")
    return parser.parse_args()


def load_images(args) -> np.ndarray:
    if args.source == "digits":
        from sklearn.datasets import load_digits

        gray = np.round(load_digits().images * (255 / 16)).astype(np.uint8)
        images = np.repeat(gray[..., None], 3, axis=-1)
        import torch
        import torch.nn.functional as F

        resized = F.interpolate(torch.from_numpy(images).permute(0, 3, 1, 2).float(), size=args.image_size)
        return resized.round().byte().permute(0, 2, 3, 1).numpy()
    if not CIFAR10.is_dir():
        raise SystemExit(f"no CIFAR-10 at {CIFAR10}: use --source digits")
    return read_image_folder(CIFAR10, args.image_size)[0].images


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    images = load_images(args)
    print(f"{len(images):,} images of {images.shape[1]} px in {time.perf_counter() - started:.0f} s", flush=True)
    folder = Path(tempfile.mkdtemp(prefix="streaming-bench-"))
    started = time.perf_counter()
    writer = ShardWriter(str(folder / "shards"), args.images_per_shard)
    images = images[np.random.default_rng(0).permutation(len(images))]  # as prepare writes them: shuffled once
    for image in images:
        writer.add(image)
    writer.close()
    size = sum(p.stat().st_size for p in (folder / "shards").iterdir())
    print(f"wrote {len(writer.files)} shards, {size / 2**20:.1f} MiB, in {time.perf_counter() - started:.0f} s")

    from selfsup.train.ray_trainer import connect_ray, pretrain_with_ray

    connect_ray(streaming=True)  # one Ray instance for both runs, with what the streamed run needs

    raw = {
        "method": {"name": args.method},
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "warmup_epochs": 0, "monitor_every": 0},
        "scaling": {"max_failures": 0},
    }
    params = load_params(raw)
    mean, std = writer.mean_std()
    spec = PretrainSpec(params.model, params.method, params.views, params.train, mean, std, images.shape[1])
    results = {}
    for name, data in (("in memory", images), ("streamed", Shards(str(folder / "shards"), writer.files, len(images)))):
        state = pretrain_with_ray(data, spec, params.scaling, folder / "runs", name.replace(" ", "-"))
        after_first = state["history"][1:] or state["history"]
        results[name] = {
            "images_per_s": round(float(np.mean([h["images_per_s"] for h in after_first])), 1),
            "epoch_s": [h["epoch_s"] for h in state["history"]],
            "final_loss": state["history"][-1]["loss"],
        }
        print(name, json.dumps(results[name]), flush=True)
    ratio = results["streamed"]["images_per_s"] / results["in memory"]["images_per_s"]
    print(f"\n{args.source}, {len(images):,} images of {images.shape[1]} px, {args.method}, batch {args.batch_size}")
    print("| path | images/s (epochs 2+) | final loss |\n|---|---|---|")
    for name, result in results.items():
        print(f"| {name} | {result['images_per_s']:,.0f} | {result['final_loss']:.4f} |")
    print(f"\nstreamed / in memory: {ratio:.2f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, **results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
