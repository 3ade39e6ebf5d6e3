"""Writing the streamed training images: decoding, resizing and encoding in one process against Ray Data tasks on
every core (what `prepare` does for a streamed dataset), the same files side by side in one run.

Two sets of files: CIFAR-10's training JPEGs from ../shared (32 px, about 1 KB each; or the embedded digits as
PNGs without it) and synthetic 12-megapixel JPEG photos (4000 x 3000, what a phone takes), both stored at
--image-size. The one-process figure is the loop prepare ran before it used Ray Data; Ray Data's includes
handing every image back to this process in order, but not starting Ray.

    python benchmarks/prepare_speed.py                  # 10,000 CIFAR-10 files and 48 photos (~2 min on 2 cores)
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

from selfsup.data import sources  # noqa: E402
from selfsup.data.shards import encode_jpeg  # noqa: E402

CIFAR10 = REPO.parent / "shared" / "datasets" / "cifar10" / "train"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small-files", type=int, default=10_000)
    parser.add_argument("--photos", type=int, default=48)
    parser.add_argument("--image-size", type=int, default=96)
    return parser.parse_args()


def small_files(count: int, folder: Path) -> list[Path]:
    if CIFAR10.is_dir():
        return sources._image_files(CIFAR10)[:count]
    from PIL import Image
    from sklearn.datasets import load_digits

    folder.mkdir(parents=True)
    paths = []
    for index, digit in enumerate(load_digits().images[:count]):
        paths.append(folder / f"{index}.png")
        Image.fromarray(np.round(digit * (255 / 16)).astype(np.uint8)).convert("RGB").save(paths[-1])
    return paths


def photos(count: int, folder: Path) -> list[Path]:
    """12 MP JPEGs of smooth shapes with sensor-like noise: about 3.5 MB each, as a phone's."""
    import torch
    import torch.nn.functional as F
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        coarse = torch.from_numpy(rng.integers(0, 256, (1, 3, 30, 40)).astype(np.float32))
        image = F.interpolate(coarse, size=(3000, 4000), mode="bicubic")[0].permute(1, 2, 0).numpy()
        image = np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)
        paths.append(folder / f"{index}.jpg")
        Image.fromarray(image).save(paths[-1], quality=90)
    return paths


def one_process(paths: list[Path], size: int) -> float:
    started = time.perf_counter()
    for _, image in sources._readable_images(paths, sources.DATA_DEFAULTS.max_image_pixels, 0.0):
        encode_jpeg(sources.center_crop_resize(image, size).permute(1, 2, 0).numpy())
    return len(paths) / (time.perf_counter() - started)


def ray_data(paths: list[Path], size: int) -> float:
    started = time.perf_counter()
    done = sum(1 for _ in sources._resized_with_ray(paths, size, sources.DATA_DEFAULTS.max_image_pixels, 0))
    assert done == len(paths)
    return len(paths) / (time.perf_counter() - started)


def main() -> None:
    args = parse_args()
    from selfsup.ray_cluster import connect_ray

    with tempfile.TemporaryDirectory(prefix="prepare-speed-") as tmp:
        sets = {
            "CIFAR-10 JPEGs (32 px)" if CIFAR10.is_dir() else "digits PNGs (8 px)": small_files(
                args.small_files, Path(tmp) / "small"
            ),
            "12 MP JPEG photos": photos(args.photos, Path(tmp) / "photos"),
        }
        connect_ray(streaming=True)
        ray_data(sets["12 MP JPEG photos"][:8], args.image_size)  # a task each: every worker starts, imports
        rows = []
        for name, paths in sets.items():
            alone, spread = one_process(paths, args.image_size), ray_data(paths, args.image_size)
            rows.append((name, len(paths), alone, spread))
            print(f"{name}: one process {alone:,.1f} images/s, Ray Data {spread:,.1f} images/s", flush=True)
    print(f"\n{os.cpu_count()} CPU cores, stored at {args.image_size} px\n")
    print("| files | count | one process (images/s) | Ray Data (images/s) | ratio |")
    print("|---|---:|---:|---:|---:|")
    for name, count, alone, spread in rows:
        print(f"| {name} | {count:,} | {alone:,.1f} | {spread:,.1f} | {spread / alone:.2f}x |")


if __name__ == "__main__":
    main()
