"""Features of a frozen encoder, extracted once per encoder and cached as arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from selfsup.data.views import to_float_images
from selfsup.models import Encoder


@torch.no_grad()
def extract_features(
    model: torch.nn.Module,
    images: np.ndarray | torch.Tensor,
    batch_size: int = 512,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """uint8 N x H x W x 3 (an array, or a tensor already on the device) -> float32 N x D outputs of `model`
    (an encoder, or a classifier's scores) in eval mode, BatchNorm frozen."""
    model = model.eval().to(device)
    if isinstance(images, np.ndarray) and not images.flags.writeable:  # e.g. from Ray's object store
        images = images.copy()  # torch warns on read-only memory it wraps
    chunks = [
        model(to_float_images(torch.as_tensor(images[i : i + batch_size]).to(device))).float().cpu()
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(chunks).numpy()


@torch.no_grad()
def reestimate_batchnorm(
    model: torch.nn.Module,
    images: np.ndarray,
    batches: int,
    batch_size: int = 512,
    device: str | torch.device | None = None,
    seed: int = 0,
) -> torch.nn.Module:
    """Replace every BatchNorm's running statistics by those of `images` (uint8 N x H x W x 3): forward passes
    in train mode, without gradient, over `batches` batches of a seeded random order (fewer when the images run
    out), each batch's statistics weighted by its size. Returns the model in eval mode, on `device` (None: where
    it is).

    A random network keeps the statistics of initialisation (mean 0, variance 1), which mis-scale its
    features; a fair random-init baseline normalises with its own activations' statistics, as a trained
    network does with its training images'. With `batches` 0, or without BatchNorm (ViTs), nothing changes.
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms or batches == 0:
        return model.eval() if device is None else model.eval().to(device)
    model = model.to(device) if device is not None else model
    device = next(model.parameters()).device
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[: batches * batch_size]
    if len(order) % batch_size == 1 and len(order) > 1:
        order = order[:-1]  # a last batch of one image has no batch statistics
    model.train()
    seen = 0
    for start in range(0, len(order), batch_size):
        batch = torch.as_tensor(images[order[start : start + batch_size].numpy()]).to(device)
        for norm in norms:  # running <- the mean over every image so far: this batch weighs len(batch) / seen
            norm.momentum = len(batch) / (seen + len(batch))
        model(to_float_images(batch))
        seen += len(batch)
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    return model.eval()


def save_features(path: str | Path, **arrays: np.ndarray) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


def load_features(path: str | Path) -> dict[str, np.ndarray]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"no features at {path}: run `dvc repro features` first")
    with np.load(path) as arrays:
        return dict(arrays)


def embed_images(encoder: Encoder, image_size: list[int], images: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """What a registered encoder serves: uint8 images (N x H x W x 3, any H and W) -> float32 N x D.

    Images of another size are resized, the shorter side to the encoder's, and center-cropped (as files are).
    """
    from selfsup.data.sources import center_crop_resize_images

    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images N x H x W x 3, got {images.dtype} {images.shape}")
    if list(images.shape[1:3]) != list(image_size):
        images = center_crop_resize_images(images, image_size[0])
    return extract_features(encoder, images, batch_size)
