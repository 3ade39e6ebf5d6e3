"""Stage `prepare`: dataset source -> data/prepared/{train,val,test}.npz + manifest.json.

`python -m pipelines.prepare transfer` (stage `prepare_transfer`) prepares eval.transfer's target the same
way into data/transfer, at the size of the prepared images: the encoder sees the target at its own size.
"""

import sys
import time

from pipelines.common import PREPARED, TRANSFER, read_params, run_stage
from selfsup.config import DataConfig
from selfsup.data.arrays import Manifest
from selfsup.data.sources import prepare_dataset


def main() -> None:
    params = read_params()
    started = time.perf_counter()
    if sys.argv[1:] == ["transfer"]:
        target = params.eval.transfer
        size = Manifest.read(PREPARED).image_size[0]
        # Read under the data section's limits: the same split and the same caps on images (data.max_*).
        shared = ("val_fraction", "max_image_pixels", "max_unreadable_fraction")
        config = DataConfig(**target.model_dump(), image_size=size, **params.data.model_dump(include=set(shared)))
        manifest = prepare_dataset(config, TRANSFER)
    else:
        manifest = prepare_dataset(params.data, PREPARED)
    counts = ", ".join(f"{name} {info['count']:,}" for name, info in manifest.splits.items())
    print(
        f"prepared {manifest.source}: {counts} images of {manifest.image_size[0]}x{manifest.image_size[1]}, "
        f"{len(manifest.class_names)} classes, sha256 {manifest.sha256[:12]} in {time.perf_counter() - started:.1f} s"
    )


if __name__ == "__main__":
    run_stage(main)
