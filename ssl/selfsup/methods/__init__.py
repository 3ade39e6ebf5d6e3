"""Self-supervised methods by name.

A method is an `nn.Module` class that declares itself once, in its own file, as class attributes:

    name        what users pick it by (`method.name`)
    Knobs       its own params with their defaults (`method.<name>` in params.yaml), validated by config
    min_batch   the smallest per-worker batch its loss is defined on
    lr          its learning rate per 256 images for SGD and LARS, which train.lr "auto" scales
    views(knobs, views, image_size) -> list[ViewSpec]   the views its forward takes, in order

and implements `forward(views) -> (loss, embeddings)`, the embeddings being what the loss compares
(watched for collapse). The one training loop also calls these hooks where a method has them:

    uses_labels                the supervised reference alone: forward(views, labels=...) gets the labels too
    uses_indices               Exemplar-CNN: forward(views, indices=...) gets the images' indices in the training set
    needs_colour               colorization: its target is constant on gray images, which `check_data` refuses
    after_backward(progress)   between backward and the optimiser step (freezing: drop gradients)
    after_step(progress)       after the optimiser step (EMA teacher, queue, centre)
    fixed_lr_parameters()      parameters the learning-rate schedule leaves at the peak learning rate
"""

from __future__ import annotations

import numpy as np
from torch import nn

from selfsup.config import MethodConfig, TrainConfig, ViewConfig
from selfsup.data.views import ViewSpec
from selfsup.errors import ConfigError
from selfsup.methods.barlow_twins import BarlowTwins
from selfsup.methods.byol import BYOL
from selfsup.methods.colorization import Colorization
from selfsup.methods.common import TrainingProgress
from selfsup.methods.counting import Counting
from selfsup.methods.dino import DINO
from selfsup.methods.exemplar import Exemplar
from selfsup.methods.inpainting import Inpainting
from selfsup.methods.jigsaw import Jigsaw
from selfsup.methods.moco import MoCo
from selfsup.methods.obow import OBoW
from selfsup.methods.relative_location import RelativeLocation
from selfsup.methods.rotation import Rotation
from selfsup.methods.simclr import SimCLR, nt_xent_loss
from selfsup.methods.simsiam import SimSiam
from selfsup.methods.supervised import LabelledLoss, Supervised
from selfsup.methods.swav import SwAV

METHODS: dict[str, type[nn.Module]] = {
    method.name: method
    for method in (
        SimCLR,
        MoCo,
        BYOL,
        SimSiam,
        SwAV,
        BarlowTwins,
        DINO,
        OBoW,
        Rotation,
        Jigsaw,
        RelativeLocation,
        Inpainting,
        Colorization,
        Counting,
        Exemplar,
        Supervised,
    )
}


def uses_labels(config: MethodConfig, train: TrainConfig | None = None) -> bool:
    """Whether training reads the labels: the supervised reference, or any method with a labelled term."""
    return getattr(METHODS[config.name], "uses_labels", False) or bool(train and train.label_loss_weight > 0)


def uses_indices(config: MethodConfig) -> bool:
    """Whether training reads which images a batch holds (Exemplar-CNN: each image is its own class)."""
    return getattr(METHODS[config.name], "uses_indices", False)


def check_data(config: MethodConfig, images: np.ndarray, source: str) -> None:
    """Refuse, before any compute, training images the method can learn nothing from: gray ones (R = G = B in
    every pixel of every image, uint8 N x H x W x 3) for a method that predicts colour."""
    if getattr(METHODS[config.name], "needs_colour", False) and _all_gray(images):
        raise ConfigError(
            f"params.yaml: method.name={config.name} predicts colour from lightness, but every training image of "
            f"{source} is gray (R = G = B), so its target is constant and it learns nothing; pick a colour "
            "dataset (data.source: cifar10, cifar100, stl10 or imagefolder) or another method"
        )


def _all_gray(images: np.ndarray) -> bool:
    return bool((images[..., 0] == images[..., 1]).all() and (images[..., 1] == images[..., 2]).all())


def build_method(
    encoder: nn.Module,
    config: MethodConfig,
    num_classes: int = 0,
    label_loss_weight: float = 0.0,
    num_images: int = 0,
) -> nn.Module:
    """The method `config` names, on `encoder`; with `label_loss_weight` > 0, plus that labelled term.
    `num_classes` sizes the label heads, `num_images` (the training set's) Exemplar-CNN's classes."""
    cls = METHODS[config.name]
    labelled = getattr(cls, "uses_labels", False) or label_loss_weight > 0
    if labelled and num_classes < 2:
        raise ValueError(f"{config.name}: training on labels needs num_classes >= 2, got {num_classes}")
    sizes = {"num_classes": num_classes} if getattr(cls, "uses_labels", False) else {}
    if uses_indices(config):
        sizes["num_images"] = num_images
    method = cls(encoder, config.knobs, **sizes)
    return LabelledLoss(method, num_classes, label_loss_weight) if label_loss_weight > 0 else method


def method_views(config: MethodConfig, views: ViewConfig, image_size: int) -> list[ViewSpec]:
    return METHODS[config.name].views(config.knobs, views, image_size)


__all__ = [
    "METHODS",
    "TrainingProgress",
    "build_method",
    "check_data",
    "method_views",
    "nt_xent_loss",
    "uses_indices",
    "uses_labels",
]
