"""The supervised reference: the same backbone, the same loop and views, trained with the labels (cross-entropy).

The only method that reads labels while pretraining (`uses_labels`), so every table can put the supervised
number beside random init and the self-supervised ones. `LabelledLoss` adds the same cross-entropy, weighted
(`train.label_loss_weight`), to any other method's loss: self-supervision as an auxiliary loss.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from pydantic import Field
from torch import nn

from selfsup.config import MethodKnobs
from selfsup.methods.base import Method, TrainingProgress
from selfsup.methods.common import labelled_cross_entropy, one_view


class Supervised(Method):
    name = "supervised"
    min_batch = 1
    lr = 0.1  # per 256 images (SGD): the usual CIFAR ResNet rate is 0.1 at batch 128
    uses_labels = True

    advice = "lower train.lr"

    class Knobs(MethodKnobs):
        label_smoothing: float = Field(default=0.0, ge=0, lt=1)

    views = staticmethod(one_view)

    def __init__(self, encoder: nn.Module, knobs: Knobs, num_classes: int):
        super().__init__()
        self.encoder, self.knobs = encoder, knobs
        self.head = nn.Linear(encoder.feature_dim, num_classes)

    def forward(self, views: list[torch.Tensor], labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.encoder(views[0])
        loss = labelled_cross_entropy(self.head, features, labels, self.knobs.label_smoothing)
        return loss, features.detach().float()


class LabelledLoss(Method, abstract=True):
    """Any method plus `weight` x the cross-entropy of a linear head on the encoder's features of its first view.

    With weight 0 it is never built (the loop trains the plain method). It is not a method of its own: it
    wraps one (`.method`, whose declarations stand, indices included), and passes the method's hooks through.
    """

    uses_labels = True

    def __init__(self, method: Method, num_classes: int, weight: float):
        super().__init__()
        self.method, self.weight = method, weight
        self.head = nn.Linear(method.encoder.feature_dim, num_classes)

    @property
    def encoder(self) -> nn.Module:
        return self.method.encoder

    def forward(
        self, views: list[torch.Tensor], labels: torch.Tensor, **inputs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        loss, embeddings = self.method(views, **inputs)  # the indices, for Exemplar-CNN
        labelled = labelled_cross_entropy(self.head, self.method.encoder(views[0]), labels)
        return loss + self.weight * labelled, embeddings

    def after_backward(self, progress: TrainingProgress) -> None:
        self.method.after_backward(progress)

    def after_step(self, progress: TrainingProgress) -> None:
        self.method.after_step(progress)

    def fixed_lr_parameters(self) -> Iterable[nn.Parameter]:
        return self.method.fixed_lr_parameters()
