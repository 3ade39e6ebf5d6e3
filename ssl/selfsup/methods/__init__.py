"""Self-supervised methods by name: the registry. What a method declares and implements is written once, in
`selfsup.methods.base.Method`; each method is one file that subclasses it and is listed here."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from torch import nn

from selfsup.config import MethodConfig, TrainConfig, ViewConfig
from selfsup.data.views import ViewSpec
from selfsup.errors import ConfigError
from selfsup.methods.barlow_twins import BarlowTwins
from selfsup.methods.base import Method, TrainingProgress
from selfsup.methods.byol import BYOL
from selfsup.methods.colorization import Colorization
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

METHOD_CLASSES: tuple[type[Method], ...] = (
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


def _registry(classes: tuple[type[Method], ...]) -> dict[str, type[Method]]:
    registry: dict[str, type[Method]] = {}
    for cls in classes:
        if cls.name in registry:
            raise TypeError(f"methods {registry[cls.name].__name__} and {cls.__name__} share the name {cls.name!r}")
        registry[cls.name] = cls
    return registry


METHODS: dict[str, type[Method]] = _registry(METHOD_CLASSES)


def method_class(config: MethodConfig) -> type[Method]:
    return METHODS[config.name]


def uses_labels(config: MethodConfig, train: TrainConfig | None = None) -> bool:
    """Whether training reads the labels: the supervised reference, or any method with a labelled term."""
    return METHODS[config.name].uses_labels or bool(train and train.label_loss_weight > 0)


def uses_indices(config: MethodConfig) -> bool:
    """Whether training reads which images a batch holds (Exemplar-CNN: each image is its own class)."""
    return METHODS[config.name].uses_indices


def check_data(config: MethodConfig, images: np.ndarray, source: str) -> None:
    """Refuse, before any compute, training images the method can learn nothing from: gray ones (R = G = B in
    every pixel of every image, uint8 N x H x W x 3) for a method that predicts colour."""
    if METHODS[config.name].needs_colour and _all_gray(images):
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
) -> Method:
    """The method `config` names, on `encoder`; with `label_loss_weight` > 0, plus that labelled term.
    `num_classes` sizes the label heads, `num_images` (the training set's) Exemplar-CNN's classes."""
    cls = METHODS[config.name]
    if (cls.uses_labels or label_loss_weight > 0) and num_classes < 2:
        raise ValueError(f"{config.name}: training on labels needs num_classes >= 2, got {num_classes}")
    sizes = {"num_classes": num_classes} if cls.uses_labels else {}
    if cls.uses_indices:
        sizes["num_images"] = num_images
    method = cls(encoder, config.knobs, **sizes)
    return LabelledLoss(method, num_classes, label_loss_weight) if label_loss_weight > 0 else method


def method_views(config: MethodConfig, views: ViewConfig, image_size: int) -> list[ViewSpec]:
    """The views the method asks for, of images stored `image_size` px square: at views.size when it is set (local
    crops scaled to it), else at the stored size."""
    specs = METHODS[config.name].views(config.knobs, views, views.size or image_size)
    if views.size is None:
        return specs
    return [spec if spec.size else replace(spec, size=views.size) for spec in specs]


__all__ = [
    "METHODS",
    "Method",
    "TrainingProgress",
    "build_method",
    "check_data",
    "method_class",
    "method_views",
    "nt_xent_loss",
    "uses_indices",
    "uses_labels",
]
