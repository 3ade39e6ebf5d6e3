"""Backbones and the Encoder (normalisation + backbone) shared by every method and evaluation."""

from selfsup.models.backbones import Encoder, load_encoder, save_encoder

__all__ = ["Encoder", "load_encoder", "save_encoder"]
