"""Semi-supervised evaluation: the whole encoder plus a linear head, fine-tuned on a few labels.

The protocol of SimCLR and BYOL (1% and 10% of ImageNet's labels), at any label fraction: the subsets
are class-balanced and nested (the 1% images are among the 10%), drawn once with a fixed seed so that
every method and every run is judged on the same images. The baseline is the same backbone trained
from scratch on the same subset with the same budget.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from selfsup.config import SemisupConfig, ViewConfig
from selfsup.data.views import make_view
from selfsup.models import Encoder


def label_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a class-balanced subset: `fraction` of each class, at least one image of each.

    Each class is shuffled once per seed and the subset takes its head, so a smaller fraction's subset
    lies inside a larger one's.
    """
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        chosen.append(members[: max(1, round(len(members) * fraction))])
    return np.sort(np.concatenate(chosen))


class _Classifier(nn.Module):
    def __init__(self, encoder: Encoder, num_classes: int):
        super().__init__()
        self.encoder = encoder
        # Standardised features (a BatchNorm without affine, as MAE's probe) and a zero head: the first steps'
        # gradients then do not depend on how the pretrained features happen to be scaled, nor wreck them.
        self.head = nn.Sequential(
            nn.BatchNorm1d(encoder.feature_dim, affine=False), nn.Linear(encoder.feature_dim, num_classes)
        )
        nn.init.zeros_(self.head[1].weight)
        nn.init.zeros_(self.head[1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def fine_tune(
    encoder: Encoder,
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    config: SemisupConfig,
    seed: int,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Fine-tune a copy of `encoder` and a new linear head on uint8 images; returns the classifier.

    The budget is a number of steps, not epochs, so every label fraction gets the same compute; each
    batch is drawn with replacement and lightly augmented on the device (random resized crop and flip).
    """
    torch.manual_seed(seed)
    model = _Classifier(copy.deepcopy(encoder), num_classes).to(device).train()
    optimizer = torch.optim.SGD(
        [
            {"params": model.encoder.parameters(), "lr": config.lr},
            {"params": model.head.parameters(), "lr": config.lr * config.head_lr_multiplier},
        ],
        momentum=0.9,
        nesterov=True,
        weight_decay=config.weight_decay,
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.steps)
    views = ViewConfig(
        crop_scale=tuple(config.crop_scale), flip_prob=config.flip_prob, jitter_prob=0.0, grayscale_prob=0.0
    )
    data = torch.from_numpy(images).to(device)
    targets = torch.from_numpy(labels).long().to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    batch = min(config.batch_size, len(data))
    for _ in range(config.steps):
        index = torch.randint(len(data), (batch,), generator=generator, device=device)
        loss = F.cross_entropy(model(make_view(data[index], views, generator)), targets[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()
