"""Backbones and the `Encoder` that every method trains and every evaluation reads.

An encoder takes float images in [0, 1] (N x 3 x H x W), normalises them with the dataset's own
mean and std (stored as buffers, so the saved weights carry them) and returns N x feature_dim.

Every backbone is built for small images (32 px CIFAR, 16 px digits): the ResNets and RegNets use the
CIFAR stem (a stride-1 3x3 conv, no max-pool), the ViTs a small patch and a positional embedding sized
for the dataset's images. Each has an `out_dim` attribute, the size of its pooled features, and a
`feature_map(x)`, its last N x out_dim x h x w map before pooling (a ViT's patch tokens on their grid). The small CNN
is here; the others, built from torchvision's blocks, are in `torchvision_backbones.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from selfsup.config import ModelConfig
from selfsup.errors import CheckpointError


class SmallCNN(nn.Module):
    """Three conv blocks for tiny images (the embedded 16x16 digits): fast enough for 2 CPU cores."""

    def __init__(self, width: float = 1.0):
        super().__init__()
        channels = [max(8, round(c * width)) for c in (32, 64, 128)]
        layers, previous = [], 3
        for i, c in enumerate(channels):
            layers += [nn.Conv2d(previous, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            if i < len(channels) - 1:
                layers.append(nn.MaxPool2d(2))
            previous = c
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_dim = channels[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.features[:-2](x)  # all but the pooling


Builder = Callable[[ModelConfig, int], nn.Module]  # (model config, image side in pixels) -> backbone with out_dim


def _from_torchvision(name: str) -> Builder:
    def build(config: ModelConfig, image_size: int) -> nn.Module:
        from selfsup.models.torchvision_backbones import TORCHVISION_BUILDERS  # seconds to import: only when used

        return TORCHVISION_BUILDERS[name](config, image_size)

    return build


# Backbone name (model.backbone) -> its builder: the one list of backbones params are checked against.
BACKBONE_BUILDERS: dict[str, Builder] = {
    "small_cnn": lambda config, image_size: SmallCNN(config.width),
    **{
        name: _from_torchvision(name)
        for name in ("resnet18", "resnet50", "vit_tiny", "vit_small", "regnet_y_400mf", "regnet_y_1_6gf")
    },
}
WIDTH_MULTIPLIED = ("small_cnn", "resnet18", "resnet50")  # the backbones model.width applies to


def build_backbone(config: ModelConfig, image_size: int = 32) -> nn.Module:
    return BACKBONE_BUILDERS[config.backbone](config, image_size)


class Encoder(nn.Module):
    """Normalisation + backbone: float images in [0, 1] -> features.

    `image_size` (the side it trains at) matters only to the ViTs, which size their positional embedding by it,
    and to the heads of methods that rebuild the image.
    """

    def __init__(self, config: ModelConfig, mean: list[float], std: list[float], image_size: int = 32):
        super().__init__()
        self.config = config
        self.image_size = image_size
        self.backbone = build_backbone(config, image_size)
        self.feature_dim = self.backbone.out_dim
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).clamp(min=1e-3).view(1, 3, 1, 1))
        # Set by the training step on CUDA, where the weights are channels_last too. Inputs a method makes
        # inside its forward (Jigsaw's tiles) arrive contiguous; compiled, a mismatch once failed the
        # backward's stride check on 1x1 maps, so the encoder converts them itself.
        self.channels_last = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone((x - self.mean) / self.std)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's last map before global pooling, N x feature_dim x h x w (OBoW's teacher reads it)."""
        return self.backbone.feature_map((x - self.mean) / self.std)


def save_encoder(encoder: Encoder, path: str | Path, image_size: list[int]) -> None:
    """Weights plus what it takes to rebuild them: plain types only, so loading needs no pickle. `image_size` is
    the stored images' [H, W] the encoder reads; it trained at `encoder.image_size` (views.size), perhaps smaller."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in encoder.state_dict().items()}
    saved = {"model": encoder.config.model_dump(), "image_size": list(image_size), "state_dict": state}
    torch.save({**saved, "trained_size": encoder.image_size}, path)


def load_encoder(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[Encoder, list[int]]:
    """Rebuild a saved encoder (in eval mode) and return it with the image size it was trained at."""
    try:
        saved = torch.load(path, map_location=map_location, weights_only=True)
        state = saved["state_dict"]
        config = ModelConfig(**saved["model"])
        trained_size = saved.get("trained_size", saved["image_size"][0])
        encoder = Encoder(config, mean=[0.0] * 3, std=[1.0] * 3, image_size=trained_size)
        encoder.load_state_dict(state)
    except FileNotFoundError:
        raise FileNotFoundError(f"no encoder at {path}: run `dvc repro pretrain` first") from None
    except ImportError as error:  # the environment lacks what the backbone is built from, not a bad file
        raise ImportError(
            f"loading the encoder at {path} needs {error.name or error}: pip install {error.name or ''}"
            " (a registered model lists what it needs in its requirements.txt)"
        ) from None
    except Exception as error:  # truncated file, wrong format, mismatched weights
        raise CheckpointError(f"cannot load the encoder at {path} ({error}); re-run `dvc repro -f pretrain`") from None
    return encoder.eval(), saved["image_size"]
