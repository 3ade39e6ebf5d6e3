"""Self-supervised methods by name.

A method is an `nn.Module` class that declares itself once, in its own file, as class attributes:

    name        what users pick it by (`method.name`)
    Knobs       its own params with their defaults (`method.<name>` in params.yaml), validated by config
    min_batch   the smallest per-worker batch its loss is defined on
    lr          its learning rate per 256 images for SGD and LARS, which train.lr "auto" scales
    views(knobs, views, image_size) -> list[ViewSpec]   the views its forward takes, in order

and implements `forward(views) -> (loss, embeddings)`, the embeddings being what the loss compares
(watched for collapse). The one training loop also calls these hooks where a method has them:

    after_backward(progress)   between backward and the optimiser step (freezing: drop gradients)
    after_step(progress)       after the optimiser step (EMA teacher, queue, centre)
    fixed_lr_parameters()      parameters the learning-rate schedule leaves at the peak learning rate
"""

from __future__ import annotations

from torch import nn

from selfsup.config import MethodConfig, ViewConfig
from selfsup.data.views import ViewSpec
from selfsup.methods.barlow_twins import BarlowTwins
from selfsup.methods.byol import BYOL
from selfsup.methods.common import TrainingProgress
from selfsup.methods.dino import DINO
from selfsup.methods.moco import MoCo
from selfsup.methods.simclr import SimCLR, nt_xent_loss
from selfsup.methods.simsiam import SimSiam
from selfsup.methods.swav import SwAV

METHODS: dict[str, type[nn.Module]] = {
    method.name: method for method in (SimCLR, MoCo, BYOL, SimSiam, SwAV, BarlowTwins, DINO)
}


def build_method(encoder: nn.Module, config: MethodConfig) -> nn.Module:
    return METHODS[config.name](encoder, config.knobs)


def method_views(config: MethodConfig, views: ViewConfig, image_size: int) -> list[ViewSpec]:
    return METHODS[config.name].views(config.knobs, views, image_size)


__all__ = ["METHODS", "TrainingProgress", "build_method", "method_views", "nt_xent_loss"]
