"""Stage `features`: frozen features of the pretrained encoder and of a random-init baseline, once."""

import numpy as np
import torch

from pipelines.common import ENCODER, FEATURES, PREPARED, read_params, run_stage
from selfsup.data.arrays import Manifest, load_split
from selfsup.eval.features import extract_features, save_features
from selfsup.models import Encoder, load_encoder


def main() -> None:
    params = read_params()
    manifest = Manifest.read(PREPARED)
    encoder, _ = load_encoder(ENCODER)
    # The baseline: the same architecture with the initial weights pretraining started from.
    torch.manual_seed(params.train.seed)
    baseline = Encoder(params.model, manifest.mean, manifest.std, image_size=manifest.image_size[0])
    arrays: dict[str, np.ndarray] = {}
    for split in ("train", "test"):
        data = load_split(PREPARED, split)
        arrays[f"{split}_labels"] = data.labels
        arrays[f"pretrained_{split}"] = extract_features(encoder, data.images, params.eval.batch_size)
        arrays[f"baseline_{split}"] = extract_features(baseline, data.images, params.eval.batch_size)
    save_features(FEATURES, **arrays)
    print(
        f"features: {arrays['pretrained_train'].shape[1]}-d for {len(arrays['train_labels'])} train and "
        f"{len(arrays['test_labels'])} test images"
    )


if __name__ == "__main__":
    run_stage(main)
