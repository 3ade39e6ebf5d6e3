"""The backbones built from torchvision's blocks: ResNets and RegNets with the CIFAR stem, ViTs for small images.

They live apart from `backbones.py` because importing torchvision costs seconds (its `ops` pull in
torch._dynamo): a stage that only loads a small CNN should not pay it. `backbones.py` imports this module
only when one of these is built.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import regnet_y_1_6gf, regnet_y_400mf
from torchvision.models.regnet import RegNet, ResBottleneckBlock
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.models.vision_transformer import VisionTransformer

from selfsup.config import ModelConfig


def residual_branch_last_norms(model: nn.Module) -> Iterator[nn.BatchNorm2d]:
    """The last BN of every residual branch: bn2 of a BasicBlock, bn3 of a Bottleneck, and in a RegNet
    block the BN after the branch's final 1x1 conv (`f.c`, a conv + norm pair)."""
    for module in model.modules():
        if isinstance(module, BasicBlock):
            yield module.bn2
        elif isinstance(module, Bottleneck):
            yield module.bn3
        elif isinstance(module, ResBottleneckBlock):
            yield module.f.c[1]


def zero_init_residual_branches(model: nn.Module) -> None:
    """Each residual block then starts as the identity (Goyal et al. 2017), as torchvision's zero_init_residual."""
    for norm in residual_branch_last_norms(model):
        nn.init.zeros_(norm.weight)


class CifarResNet(nn.Module):
    """torchvision's ResNet with the CIFAR stem (3x3 conv, stride 1, no max-pool) or its own ImageNet stem (7x7
    conv, stride 2, max-pool), no fc, and a channel width multiplier. torchvision's ResNet hard-codes 64 stem
    channels, so this rebuilds its trunk from the same blocks with the same stage builder (`ResNet._make_layer`)
    and the same initialisation."""

    # torchvision's stage builder; it reads inplanes, dilation, groups, base_width and _norm_layer from self.
    _make_layer = ResNet._make_layer

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        blocks_per_stage: list[int],
        width: float = 1.0,
        zero_init_residual: bool = False,
        stem: str = "cifar",
    ):
        super().__init__()
        planes = [max(8, round(c * width)) for c in (64, 128, 256, 512)]
        self._norm_layer = nn.BatchNorm2d
        self.inplanes, self.dilation, self.groups, self.base_width = planes[0], 1, 1, 64
        if stem == "imagenet":
            conv, pool = nn.Conv2d(3, planes[0], 7, stride=2, padding=3, bias=False), [nn.MaxPool2d(3, 2, 1)]
        else:
            conv, pool = nn.Conv2d(3, planes[0], kernel_size=3, stride=1, padding=1, bias=False), []
        self.stem = nn.Sequential(conv, nn.BatchNorm2d(planes[0]), nn.ReLU(inplace=True), *pool)
        self.layer1 = self._make_layer(block, planes[0], blocks_per_stage[0])
        self.layer2 = self._make_layer(block, planes[1], blocks_per_stage[1], stride=2)
        self.layer3 = self._make_layer(block, planes[2], blocks_per_stage[2], stride=2)
        self.layer4 = self._make_layer(block, planes[3], blocks_per_stage[3], stride=2)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_dim = planes[3] * block.expansion

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if zero_init_residual:
            zero_init_residual_branches(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.feature_map(x))

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))


def _check_patch_divides(size: int, patch_size: int) -> None:
    if size % patch_size:
        raise ValueError(f"image size {size} is not divisible by the ViT patch size {patch_size}")


class SmallImageViT(VisionTransformer):
    """torchvision's ViT without its classification head, returning the class token's final hidden state.

    It takes any input whose sides are multiples of the patch, not just `image_size`: multi-crop methods
    feed smaller local crops. The positional embedding of the patch tokens, learned for the `image_size`
    grid, is then interpolated bicubically to the input's grid (DINO's `interpolate_pos_encoding`); the
    class token's embedding is kept as is.
    """

    def __init__(
        self, image_size: int, patch_size: int, num_layers: int, num_heads: int, hidden_dim: int, mlp_dim: int
    ):
        _check_patch_divides(image_size, patch_size)
        super().__init__(image_size, patch_size, num_layers, num_heads, hidden_dim, mlp_dim)
        self.heads = nn.Identity()
        self.out_dim = hidden_dim

    def position_embedding(self, grid_height: int, grid_width: int) -> torch.Tensor:
        """1 x (1 + grid_height * grid_width) x hidden_dim: the class token's, then the patches' row by row."""
        embedding = self.encoder.pos_embedding
        native = self.image_size // self.patch_size
        if (grid_height, grid_width) == (native, native):
            return embedding  # no resampling at the native size: exactly torchvision's forward
        class_embedding, patch_embedding = embedding[:, :1], embedding[:, 1:]
        patch_grid = patch_embedding.reshape(1, native, native, -1).permute(0, 3, 1, 2)
        patch_grid = F.interpolate(patch_grid, size=(grid_height, grid_width), mode="bicubic", align_corners=False)
        return torch.cat([class_embedding, patch_grid.flatten(2).transpose(1, 2)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tokens(x)[:, 0]

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The patch tokens' final states on their grid: N x hidden_dim x height/patch x width/patch."""
        grid = (x.shape[2] // self.patch_size, x.shape[3] // self.patch_size)
        return self.tokens(x)[:, 1:].transpose(1, 2).unflatten(2, grid)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        # torchvision's forward, minus its check that the input is image_size and with a resized position embedding
        n, _, height, width = x.shape
        _check_patch_divides(height, self.patch_size)
        _check_patch_divides(width, self.patch_size)
        patches = self.conv_proj(x).flatten(2).transpose(1, 2)  # N x patches x hidden_dim
        tokens = torch.cat([self.class_token.expand(n, -1, -1), patches], dim=1)
        tokens = tokens + self.position_embedding(height // self.patch_size, width // self.patch_size)
        encoder = self.encoder
        return encoder.ln(encoder.layers(encoder.dropout(tokens)))


class CifarRegNet(RegNet):
    """torchvision's RegNet with its last map exposed, as every backbone has."""

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk_output(self.stem(x))


def cifar_regnet(build_torchvision_regnet: Callable[..., nn.Module], config: ModelConfig) -> nn.Module:
    """A torchvision RegNet (untrained) with the CIFAR stem (or its own) and no fc: returns its pooled trunk
    features."""
    model = build_torchvision_regnet(weights=None)
    model.__class__ = CifarRegNet  # torchvision's builders pick the block widths; only a method is added
    if config.stem == "cifar":  # the stem's 3x3 conv at stride 1, so 32 px images keep their resolution
        model.stem[0].stride = (1, 1)
    model.out_dim = model.fc.in_features
    model.fc = nn.Identity()
    if config.zero_init_residual:
        zero_init_residual_branches(model)
    return model


Builder = Callable[[ModelConfig, int], nn.Module]  # (model config, image side in pixels) -> backbone with out_dim


def _resnet(block: type[BasicBlock | Bottleneck], blocks_per_stage: list[int]) -> Builder:
    return lambda config, image_size: CifarResNet(
        block, blocks_per_stage, config.width, config.zero_init_residual, config.stem
    )


def _vit(hidden_dim: int, num_layers: int, num_heads: int, mlp_dim: int) -> Builder:
    return lambda config, image_size: SmallImageViT(
        image_size, config.patch_size, num_layers, num_heads, hidden_dim, mlp_dim
    )


def _regnet(build_torchvision_regnet: Callable[..., nn.Module]) -> Builder:
    return lambda config, image_size: cifar_regnet(build_torchvision_regnet, config)


# Backbone name (model.backbone) -> its builder; backbones.BACKBONE_BUILDERS reaches these lazily.
TORCHVISION_BUILDERS: dict[str, Builder] = {
    "resnet18": _resnet(BasicBlock, [2, 2, 2, 2]),
    "resnet50": _resnet(Bottleneck, [3, 4, 6, 3]),
    "vit_tiny": _vit(hidden_dim=192, num_layers=12, num_heads=3, mlp_dim=768),
    "vit_small": _vit(hidden_dim=384, num_layers=12, num_heads=6, mlp_dim=1536),
    "regnet_y_400mf": _regnet(regnet_y_400mf),
    "regnet_y_1_6gf": _regnet(regnet_y_1_6gf),
}
