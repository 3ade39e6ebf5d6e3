"""Exemplar-CNN (Dosovitskiy et al., 2014): every training image is its own surrogate class, and the network
classifies heavily augmented views of it.

A pretext task: the label of a view is the index of its image (`uses_indices`: the loop passes each batch's
indices into the training set). Two classifiers over the N images:

- `memory_bank` (the default): non-parametric, as Wu et al.'s instance discrimination (2018) made Exemplar-CNN
  scale. The weights of class i are a stored, L2-normalised embedding of image i's latest view, so the loss is
  softmax(f . V^T / T) against class i, and v_i <- normalise(m v_i + (1 - m) f_i) after each step. The bank is
  N x embedding_dim on the device (45,000 x 128 floats is 23 MB for CIFAR-10), updated without gradient; its
  cost per image is one N x 128 product, so the exact softmax serves up to about a million images, past which
  one samples negatives from the bank instead (NCE).
- `parametric`: the paper's N-way classifier, a learned class vector per image (here compared by cosine at the
  same temperature, so the two differ only in where the class vectors come from). Its weights grow with N and
  each row learns only from its own image's one view per epoch, which is why the paper stopped at 32,000.

The paper draws ~100 transforms of each 32 px seed patch once, up front; here every step draws a fresh view of
the whole image with the pipeline's augmentations (`views:`), which the paper's translation, scale and colour
changes resemble: the images are already small, so no patches are cut.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from selfsup.config import MethodKnobs
from selfsup.distributed import all_gather
from selfsup.methods.base import Method, TrainingProgress
from selfsup.methods.common import one_view
from selfsup.models.heads import mlp


def instance_logits(embeddings: torch.Tensor, classes: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cosine similarity of each normalised embedding to every class vector, over the temperature: N x classes."""
    return F.normalize(embeddings, dim=1) @ F.normalize(classes, dim=1).T / temperature


class Exemplar(Method):
    name = "exemplar"
    min_batch = 1  # the other images are in the bank, not the batch
    lr = 0.03  # per 256 images (SGD), Wu et al.'s 0.03 at batch 256
    uses_indices = True

    advice = "raise method.exemplar.temperature"

    class Knobs(MethodKnobs):
        classifier: Literal["memory_bank", "parametric"] = "memory_bank"
        embedding_dim: int = Field(default=128, ge=1)  # Wu et al.'s
        # Wu et al.'s 0.07 suits hundreds of epochs; at a few, each image's row is a stale target and a softer
        # softmax learned more on the digits and on CIFAR-10 (docs/methods.md).
        temperature: float = Field(default=0.5, gt=0)
        bank_momentum: float = Field(default=0.5, ge=0, lt=1)  # Wu et al.'s m
        projection_hidden_dim: int = Field(default=0, ge=0)  # 0: a linear projection, as Wu et al.

    views = staticmethod(one_view)

    def __init__(self, encoder: nn.Module, knobs: Knobs, num_images: int):
        super().__init__()
        if num_images < 2:
            raise ValueError(f"exemplar: each image is a class, so it needs at least 2 images, got {num_images}")
        self.encoder, self.knobs = encoder, knobs
        hidden = knobs.projection_hidden_dim
        dim = encoder.feature_dim
        self.projector = mlp(dim, hidden, knobs.embedding_dim) if hidden else nn.Linear(dim, knobs.embedding_dim)
        if knobs.classifier == "memory_bank":
            # Random unit vectors, as Wu et al.: a buffer, so checkpoints and every worker hold the same bank.
            self.register_buffer("bank", F.normalize(torch.randn(num_images, knobs.embedding_dim), dim=1))
        else:
            self.classes = nn.Parameter(F.normalize(torch.randn(num_images, knobs.embedding_dim), dim=1))
        self._seen: tuple[torch.Tensor, torch.Tensor] | None = None  # this step's (indices, embeddings)

    def forward(self, views: list[torch.Tensor], indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embeddings = self.projector(self.encoder(views[0])).float()
        with torch.autocast(embeddings.device.type, enabled=False):
            classes = self.bank if self.knobs.classifier == "memory_bank" else self.classes
            loss = F.cross_entropy(instance_logits(embeddings, classes, self.knobs.temperature), indices)
        self._seen = (indices, F.normalize(embeddings.detach(), dim=1))
        return loss, embeddings.detach()

    @torch.no_grad()
    def after_step(self, progress: TrainingProgress) -> None:
        if self.knobs.classifier == "memory_bank":
            indices, embeddings = self._seen
            # Every worker writes every worker's images: the bank stays one and the same everywhere.
            self.update_bank(all_gather(indices), all_gather(embeddings))

    @torch.no_grad()
    def update_bank(self, indices: torch.Tensor, embeddings: torch.Tensor) -> None:
        """v_i <- normalise(m v_i + (1 - m) f_i) for each image i of the step."""
        m = self.knobs.bank_momentum
        self.bank[indices] = F.normalize(m * self.bank[indices] + (1 - m) * embeddings.to(self.bank.dtype), dim=1)
