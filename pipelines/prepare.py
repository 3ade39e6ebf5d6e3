"""Stage `prepare`: dataset source -> data/prepared/{train,val,test}.npz + manifest.json.

`python -m pipelines.prepare transfer` (stage `prepare_transfer`) prepares eval.transfer's target the same
way into data/transfer, and `python -m pipelines.prepare eval` (stage `prepare_eval`) the labelled evaluation
data (eval.data, or STL-10's labelled splits) into data/eval, both at the size of the prepared images: the
encoder sees them at its own size. Without evaluation data of its own, data/eval holds only a note.
"""

import shutil
import sys
import time

from pipelines.common import EVAL_DATA, PREPARED, TRANSFER, read_params, run_stage
from selfsup.config import DataConfig
from selfsup.data.arrays import Manifest
from selfsup.data.sources import prepare_dataset

SAME_DATA_NOTE = """\
No evaluation data of its own (eval.data: null): the monitor and the evaluations read the pretraining data's
labelled splits, data/prepared.
"""


def main() -> None:
    params = read_params()
    started = time.perf_counter()
    out = {("transfer",): TRANSFER, ("eval",): EVAL_DATA}.get(tuple(sys.argv[1:]), PREPARED)
    # The stage's own output, which DVC removes before running it anyway: nothing of an earlier layout (arrays or
    # shards) stays beside the new one.
    shutil.rmtree(out, ignore_errors=True)
    if out == TRANSFER:
        manifest = _prepare_beside(params, params.eval.transfer, TRANSFER)
    elif out == EVAL_DATA:
        if params.evaluation_data is None:
            EVAL_DATA.mkdir(parents=True)
            (EVAL_DATA / "README").write_text(SAME_DATA_NOTE)
            print("evaluation data: the pretraining data's own splits")
            return
        manifest = _prepare_beside(params, params.evaluation_data, EVAL_DATA)
    else:
        manifest = prepare_dataset(params.data, PREPARED)
    counts = ", ".join(f"{name} {info['count']:,}" for name, info in manifest.splits.items())
    print(
        f"prepared {manifest.source}: {counts} images of {manifest.image_size[0]}x{manifest.image_size[1]}, "
        f"{len(manifest.class_names)} classes, sha256 {manifest.sha256[:12]} in {time.perf_counter() - started:.1f} s"
    )


def _prepare_beside(params, labelled, out) -> Manifest:
    """A labelled dataset of the evaluations (eval.transfer, eval.data) at the prepared images' size, read under
    the data section's limits: the same validation share and the same caps on images (data.max_*)."""
    size = Manifest.read(PREPARED).image_size[0]
    shared = ("val_fraction", "max_image_pixels", "max_unreadable_fraction")
    config = DataConfig(**labelled.model_dump(), image_size=size, **params.data.model_dump(include=set(shared)))
    return prepare_dataset(config, out)


if __name__ == "__main__":
    run_stage(main)
