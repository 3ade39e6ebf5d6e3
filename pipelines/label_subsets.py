"""Stage `label_subsets`: the class-balanced label subsets of semi-supervised evaluation, drawn once.

data/label_subsets.json holds, per fraction of eval.semisup.fractions, the indices into the training
split of the evaluation data: every method and every run is fine-tuned on the same images.
"""

from pipelines.common import LABEL_SUBSETS, evaluation_data, missing_labels, read_params, run_stage, write_json
from selfsup.data.arrays import Manifest, load_labels
from selfsup.eval.semisup import label_subset


def main() -> None:
    config = read_params().eval.semisup
    folder = evaluation_data()
    manifest = Manifest.read(folder)
    reason = missing_labels(manifest)
    subsets = {}
    if not reason:
        labels = load_labels(folder, "train")
        subsets = {str(f): label_subset(labels, f, config.subset_seed).tolist() for f in config.fractions}
    write_json(
        LABEL_SUBSETS,
        {
            "train_sha256": manifest.splits["train"]["sha256"],
            "seed": config.subset_seed,
            **{"subsets": subsets},
            **({"skipped": reason} if reason else {}),
        },
    )
    if reason:
        print(f"label subsets: skipped: {reason}")
    else:
        print("label subsets: " + ", ".join(f"{float(f):.0%} = {len(i)} images" for f, i in subsets.items()))


if __name__ == "__main__":
    run_stage(main)
