"""Backbones: every name builds and trains, ResNets/RegNets match torchvision's structure and initialisation,
ViTs take other image sizes, and a saved ViT encoder loads back exactly."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from torch import nn
from torchvision.models import resnet18
from torchvision.models.regnet import ResBottleneckBlock
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.models.vision_transformer import VisionTransformer

from selfsup.config import ModelConfig
from selfsup.models import BACKBONE_BUILDERS, WIDTH_MULTIPLIED, Encoder, build_backbone, load_encoder, save_encoder


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def residual_last_norm_weights(model: nn.Module) -> list[torch.Tensor]:
    """Found here from torchvision's own block classes, independently of the library's helper."""
    weights = []
    for module in model.modules():
        if isinstance(module, BasicBlock):
            weights.append(module.bn2.weight)
        elif isinstance(module, Bottleneck):
            weights.append(module.bn3.weight)
        elif isinstance(module, ResBottleneckBlock):
            weights.append(module.f.c[1].weight)
    return weights


def test_registry_covers_every_configurable_backbone():
    from selfsup.models.torchvision_backbones import TORCHVISION_BUILDERS

    assert set(BACKBONE_BUILDERS) == {"small_cnn", *TORCHVISION_BUILDERS}


def test_a_small_cnn_encoder_round_trips_without_importing_torchvision(tmp_path):
    """Importing torchvision costs every stage seconds (its ops import torch._dynamo); the small CNN needs none."""
    script = (
        "import sys; from selfsup.config import ModelConfig; from selfsup.models import Encoder, save_encoder, "
        f"load_encoder; save_encoder(Encoder(ModelConfig(), [0.5] * 3, [0.2] * 3, 16), {str(tmp_path / 'e.pt')!r}, "
        f"[16, 16]); load_encoder({str(tmp_path / 'e.pt')!r}); print(sorted(m for m in sys.modules if "
        "m.split('.')[0] == 'torchvision'))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "name, width, out_dim",
    [
        ("small_cnn", 0.25, 32),
        ("resnet18", 0.25, 128),
        ("resnet50", 0.25, 512),
        ("resnet50", 1.0, 2048),
        ("vit_tiny", 1.0, 192),
        ("vit_small", 1.0, 384),
        ("regnet_y_400mf", 1.0, 440),
        ("regnet_y_1_6gf", 1.0, 888),
    ],
)
def test_backbone_maps_images_to_finite_features_and_trains(name, width, out_dim):
    torch.manual_seed(0)
    backbone = build_backbone(ModelConfig(backbone=name, width=width), image_size=32)
    features = backbone(torch.rand(2, 3, 32, 32))
    assert backbone.out_dim == out_dim
    assert features.shape == (2, out_dim)
    assert torch.isfinite(features).all()
    features.square().mean().backward()
    gradients = [p.grad for p in backbone.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in gradients)
    assert any(g.abs().sum() > 0 for g in gradients)


def test_resnet18_is_torchvisions_without_fc_and_with_a_3x3_stem():
    reference = resnet18(weights=None)
    stem_7x7, stem_3x3 = reference.conv1.weight.numel(), 64 * 3 * 3 * 3
    expected = parameter_count(reference) - parameter_count(reference.fc) - stem_7x7 + stem_3x3
    backbone = build_backbone(ModelConfig(backbone="resnet18"))
    assert parameter_count(backbone) == expected
    assert backbone.stem(torch.rand(2, 3, 32, 32)).shape == (2, 64, 32, 32)  # no stride, no max-pool


def test_width_keeps_at_least_8_channels():
    backbone = build_backbone(ModelConfig(backbone="resnet18", width=0.01))
    assert backbone.stem[0].out_channels == 8 and backbone.out_dim == 8


def test_regnet_stem_keeps_the_resolution():
    backbone = build_backbone(ModelConfig(backbone="regnet_y_400mf"))
    assert backbone.stem(torch.rand(1, 3, 32, 32)).shape[-2:] == (32, 32)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "regnet_y_400mf"])
@pytest.mark.parametrize("zero_init_residual", [True, False])
def test_zero_init_residual_sets_each_blocks_last_bn_scale(name, zero_init_residual):
    width = 0.25 if name in WIDTH_MULTIPLIED else 1.0
    config = ModelConfig(backbone=name, width=width, zero_init_residual=zero_init_residual)
    weights = residual_last_norm_weights(build_backbone(config))
    assert len(weights) == {"resnet18": 8, "resnet50": 16, "regnet_y_400mf": 16}[name]
    expected = 0.0 if zero_init_residual else 1.0
    assert all(torch.equal(w, torch.full_like(w, expected)) for w in weights)


@pytest.mark.parametrize("name", ["resnet18", "regnet_y_400mf"])
def test_convolutions_are_kaiming_normal_fan_out(name):
    torch.manual_seed(0)
    backbone = build_backbone(ModelConfig(backbone=name))
    largest = max((m for m in backbone.modules() if isinstance(m, nn.Conv2d)), key=lambda m: m.weight.numel())
    assert largest.weight.numel() > 100_000  # enough samples for a tight estimate of the std
    fan_out = largest.out_channels * largest.kernel_size[0] * largest.kernel_size[1]
    assert largest.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.02)
    assert abs(largest.weight.mean().item()) < 0.05 * math.sqrt(2 / fan_out)


@pytest.fixture(scope="module")
def vit_tiny():
    torch.manual_seed(0)
    return build_backbone(ModelConfig(backbone="vit_tiny", patch_size=4), image_size=32).eval()


def test_vit_takes_smaller_inputs_by_interpolating_the_position_embedding(vit_tiny):
    with torch.no_grad():
        assert vit_tiny(torch.rand(2, 3, 16, 16)).shape == (2, 192)
        assert vit_tiny(torch.rand(2, 3, 32, 32)).shape == (2, 192)
    embedding = vit_tiny.position_embedding(4, 4)
    assert embedding.shape == (1, 1 + 16, 192)
    assert torch.equal(embedding[:, 0], vit_tiny.encoder.pos_embedding[:, 0])  # the class token's is kept


def test_vit_at_its_native_size_matches_torchvisions_forward(vit_tiny):
    reference = VisionTransformer(32, 4, num_layers=12, num_heads=3, hidden_dim=192, mlp_dim=768).eval()
    reference.heads = nn.Identity()
    reference.load_state_dict(vit_tiny.state_dict())
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(vit_tiny(images), reference(images))


def test_vit_rejects_sizes_the_patch_does_not_divide(vit_tiny):
    with pytest.raises(ValueError, match=r"18\b.*\b4\b"):
        vit_tiny(torch.rand(1, 3, 18, 18))
    with pytest.raises(ValueError, match=r"30\b.*\b4\b"):
        build_backbone(ModelConfig(backbone="vit_tiny", patch_size=4), image_size=30)


def test_saved_vit_encoder_loads_back_identical(tmp_path):
    torch.manual_seed(0)
    config = ModelConfig(backbone="vit_tiny", patch_size=4)
    encoder = Encoder(config, [0.5, 0.4, 0.3], [0.2, 0.25, 0.3], image_size=16).eval()
    path = tmp_path / "encoder.pt"
    save_encoder(encoder, path, [16, 16])
    loaded, image_size = load_encoder(path)
    assert image_size == [16, 16] and loaded.image_size == 16
    images = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(images), encoder(images))


@pytest.mark.parametrize("name", BACKBONE_BUILDERS)
def test_every_backbone_shows_its_last_map_whose_average_is_its_features(name):
    """OBoW's teacher reads the map; a CNN's pooled features are its mean, a ViT's map is its patch tokens."""
    torch.manual_seed(0)
    width = 0.25 if name in WIDTH_MULTIPLIED else 1.0
    encoder = Encoder(ModelConfig(backbone=name, width=width), [0.5] * 3, [0.25] * 3, image_size=16).eval()
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        features, feature_map = encoder(x), encoder.feature_map(x)
    assert feature_map.shape[:2] == (2, encoder.feature_dim) and feature_map.dim() == 4
    if name.startswith("vit"):
        assert feature_map.shape[2:] == (4, 4)  # 16 px in patches of 4
    else:
        torch.testing.assert_close(feature_map.mean((2, 3)), features, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("name", "reduction"), [("resnet18", 4), ("regnet_y_400mf", 2)])
def test_the_imagenet_stem_is_torchvisions_own_and_reduces_the_resolution_as_it(name, reduction):
    """The ImageNet recipe's ResNet stem at 224 px reaches the first stage at 56 px, as torchvision's does (its
    RegNets' stem: stride 2); the CIFAR stem keeps 32 px whole. The trunk after it is the same."""
    x = torch.rand(1, 3, 64, 64)
    maps = {}
    for stem in ("cifar", "imagenet"):
        torch.manual_seed(0)
        backbone = build_backbone(ModelConfig(backbone=name, width=0.25, stem=stem), image_size=64).eval()
        with torch.no_grad():
            maps[stem] = backbone.feature_map(x)
    assert maps["cifar"].shape[1] == maps["imagenet"].shape[1]
    assert maps["cifar"].shape[2] == reduction * maps["imagenet"].shape[2]
    if name == "resnet18":
        stem = build_backbone(ModelConfig(backbone=name, stem="imagenet")).stem
        reference = resnet18()
        assert [type(m) for m in stem] == [
            type(reference.conv1),
            type(reference.bn1),
            type(reference.relu),
            type(reference.maxpool),
        ]
        assert (stem[0].kernel_size, stem[0].stride, stem[3].stride) == ((7, 7), (2, 2), 2)
