"""Self-supervised methods by name. A method is an nn.Module: `forward(views) -> loss`, owning its heads."""

from __future__ import annotations

from torch import nn

from selfsup.config import METHOD_MIN_BATCH, MethodConfig
from selfsup.methods.simclr import SimCLR, nt_xent_loss
from selfsup.models import Encoder

METHODS: dict[str, type[nn.Module]] = {"simclr": SimCLR}
# The number of views each method's forward takes.
NUM_VIEWS = {"simclr": 2}
assert METHODS.keys() == METHOD_MIN_BATCH.keys() == NUM_VIEWS.keys(), "register a method in config too"


def build_method(encoder: Encoder, config: MethodConfig) -> nn.Module:
    return METHODS[config.name](encoder, config)


__all__ = ["METHODS", "NUM_VIEWS", "build_method", "nt_xent_loss"]
