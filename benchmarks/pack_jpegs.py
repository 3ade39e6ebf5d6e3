"""Pack an ImageFolder's JPEG bytes into one file, to carry a dataset to a machine without it.

The GPU machine lent for benchmarks has no ../shared and takes at most 64 MiB along; CIFAR-10 train's
50,000 JPEGs pack into about 50 MB. `throughput.py --packed FILE` decodes them there.

    python benchmarks/pack_jpegs.py ../shared/datasets/cifar10/train .bench/cifar10-train.npz
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def pack(folder: Path, destination: Path) -> None:
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    blobs, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((folder / name).glob("*.jp*g")):
            blobs.append(np.frombuffer(path.read_bytes(), dtype=np.uint8))
            labels.append(label)
    offsets = np.cumsum([0] + [len(b) for b in blobs])
    destination.parent.mkdir(parents=True, exist_ok=True)
    np.savez(destination, data=np.concatenate(blobs), offsets=offsets, labels=np.array(labels), classes=classes)
    print(f"packed {len(blobs):,} JPEGs ({offsets[-1] / 1e6:.1f} MB) of {len(classes)} classes into {destination}")


def unpack_images(path: Path) -> np.ndarray:
    """The packed JPEGs decoded to uint8 N x H x W x 3 (all images must share one size)."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    with np.load(path) as packed:
        data, offsets = torch.from_numpy(packed["data"]), packed["offsets"]
    jpegs = [data[start:end] for start, end in zip(offsets[:-1], offsets[1:])]
    return torch.stack(decode_jpeg(jpegs, mode=ImageReadMode.RGB)).permute(0, 2, 3, 1).numpy()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="an ImageFolder split: <class>/*.jpg")
    parser.add_argument("destination", type=Path)
    arguments = parser.parse_args()
    pack(arguments.folder, arguments.destination)
