"""Stage `features`: frozen features of the pretrained encoder and of a random-init baseline (its BatchNorm
statistics re-estimated on the pretraining images, as the encoder's were), once, for every split of the labelled
evaluation data (features/features.npz: eval.data, else the prepared dataset) and of the transfer target
(features/transfer.npz)."""

from pathlib import Path

import numpy as np
import torch

from pipelines.common import (
    ENCODER,
    FEATURES,
    PREPARED,
    TRANSFER,
    TRANSFER_FEATURES,
    evaluation_data,
    missing_labels,
    read_params,
    run_stage,
)
from selfsup.data.arrays import Manifest, load_split
from selfsup.eval.features import extract_features, reestimate_batchnorm, save_features
from selfsup.models import Encoder, load_encoder


def main() -> None:
    params = read_params()
    manifest = Manifest.read(PREPARED)
    encoder, _ = load_encoder(ENCODER)
    # The baseline: the same architecture with the initial weights pretraining started from, its BatchNorm
    # statistics those of the training images (as the pretrained encoder's are).
    torch.manual_seed(params.train.seed)
    baseline = Encoder(params.model, manifest.mean, manifest.std, image_size=manifest.image_size[0])
    # Streamed training images are not in memory: the held-out ones, drawn from the same images, stand for them.
    train_images = load_split(PREPARED, "val" if manifest.streamed else "train").images
    reestimate_batchnorm(baseline, train_images, params.eval.baseline_batchnorm_batches, params.eval.batch_size)
    datasets = [(evaluation_data(), FEATURES), (TRANSFER, TRANSFER_FEATURES)]
    if reason := missing_labels(Manifest.read(evaluation_data())):  # kNN, linear, fine-tuning skip; transfer runs
        save_features(FEATURES, skipped=np.array(reason))
        datasets = datasets[1:]
    for folder, out in datasets:
        dataset = Manifest.read(folder)
        arrays = _features_of_every_split(
            folder, dataset, {"pretrained": encoder, "baseline": baseline}, params.eval.batch_size
        )
        save_features(out, **arrays)
        counts = ", ".join(f"{info['count']} {split}" for split, info in dataset.splits.items())
        print(f"features of {dataset.source}: {arrays['pretrained_train'].shape[1]}-d for {counts} images")


def _features_of_every_split(
    folder: Path, manifest: Manifest, encoders: dict[str, Encoder], batch_size: int
) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    for split in manifest.splits:
        data = load_split(folder, split)
        arrays[f"{split}_labels"] = data.labels
        for name, encoder in encoders.items():
            arrays[f"{name}_{split}"] = extract_features(encoder, data.images, batch_size)
    return arrays


if __name__ == "__main__":
    run_stage(main)
