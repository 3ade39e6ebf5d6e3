"""Backbones and the `Encoder` that every method trains and every evaluation reads.

An encoder takes float images in [0, 1] (N x 3 x H x W), normalises them with the dataset's own
mean and std (stored as buffers, so the saved weights carry them) and returns N x feature_dim.
"""

from __future__ import annotations

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


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 with the CIFAR stem (3x3 conv, stride 1, no max-pool) and a channel width multiplier."""

    def __init__(self, width: float = 1.0):
        super().__init__()
        widths = [max(8, round(c * width)) for c in (64, 128, 256, 512)]
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)
        )
        blocks, previous = [], widths[0]
        for i, c in enumerate(widths):
            stride = 1 if i == 0 else 2
            blocks += [BasicBlock(previous, c, stride), BasicBlock(c, c, 1)]
            previous = c
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_dim = widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.blocks(self.stem(x)))


BACKBONE_CLASSES = {"small_cnn": SmallCNN, "resnet18": ResNet18}


class Encoder(nn.Module):
    """Normalisation + backbone: float images in [0, 1] -> features."""

    def __init__(self, config: ModelConfig, mean: list[float], std: list[float]):
        super().__init__()
        self.config = config
        self.backbone = BACKBONE_CLASSES[config.backbone](config.width)
        self.feature_dim = self.backbone.out_dim
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).clamp(min=1e-3).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone((x - self.mean) / self.std)


def save_encoder(encoder: Encoder, path: str | Path, image_size: list[int]) -> None:
    """Weights plus what it takes to rebuild them: plain types only, so loading needs no pickle."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in encoder.state_dict().items()}
    torch.save({"model": encoder.config.model_dump(), "image_size": list(image_size), "state_dict": state}, path)


def load_encoder(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[Encoder, list[int]]:
    """Rebuild a saved encoder (in eval mode) and return it with the image size it was trained at."""
    try:
        saved = torch.load(path, map_location=map_location, weights_only=True)
        state = saved["state_dict"]
        encoder = Encoder(ModelConfig(**saved["model"]), mean=[0.0] * 3, std=[1.0] * 3)
        encoder.load_state_dict(state)
    except FileNotFoundError:
        raise FileNotFoundError(f"no encoder at {path}: run `dvc repro pretrain` first") from None
    except Exception as error:  # truncated file, wrong format, mismatched weights
        raise CheckpointError(f"cannot load the encoder at {path} ({error}); re-run `dvc repro -f pretrain`") from None
    return encoder.eval(), saved["image_size"]
