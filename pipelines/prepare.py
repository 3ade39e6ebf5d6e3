"""Stage `prepare`: dataset source -> data/prepared/{train,test}.npz + manifest.json."""

import time

from pipelines.common import PREPARED, read_params, run_stage
from selfsup.data.sources import prepare_dataset


def main() -> None:
    params = read_params()
    started = time.perf_counter()
    manifest = prepare_dataset(params.data, PREPARED)
    counts = ", ".join(f"{name} {info['count']:,}" for name, info in manifest.splits.items())
    print(
        f"prepared {manifest.source}: {counts} images of {manifest.image_size[0]}x{manifest.image_size[1]}, "
        f"{len(manifest.class_names)} classes, sha256 {manifest.sha256[:12]} in {time.perf_counter() - started:.1f} s"
    )


if __name__ == "__main__":
    run_stage(main)
