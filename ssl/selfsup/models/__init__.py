"""Backbones and the Encoder (normalisation + backbone) shared by every method and evaluation."""

from selfsup.models.backbones import (
    BACKBONE_BUILDERS,
    WIDTH_MULTIPLIED,
    Encoder,
    build_backbone,
    load_encoder,
    save_encoder,
)

__all__ = ["BACKBONE_BUILDERS", "WIDTH_MULTIPLIED", "Encoder", "build_backbone", "load_encoder", "save_encoder"]
