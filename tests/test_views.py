"""Batched, seeded view augmentations: determinism, output contract, and each augmentation's effect."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from selfsup.config import ViewConfig
from selfsup.data.views import make_view, to_float_images, view_generator

ROOT = Path(__file__).resolve().parents[1]
IDENTITY = ViewConfig(crop_scale=(1.0, 1.0), flip_prob=0, jitter_prob=0, grayscale_prob=0, blur_prob=0, solarize_prob=0)
# Every augmentation but blur; WITH_BLUR adds it.
EVERYTHING = ViewConfig(
    crop_scale=(0.2, 1.0),
    flip_prob=0.5,
    jitter_prob=1.0,
    jitter_strength=1.0,
    grayscale_prob=0.5,
    blur_prob=0.0,
    solarize_prob=0.5,
)
WITH_BLUR = EVERYTHING.model_copy(update={"blur_prob": 0.5})


def random_images(n: int = 6, size: int = 16, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=generator)


def smooth_images(n: int = 4, size: int = 32) -> torch.Tensor:
    """Slowly varying, asymmetric images (so bilinear resampling barely changes them, a mirror does)."""
    ramp = torch.linspace(0, 1, size)
    y, x = ramp.view(size, 1), ramp.view(1, size)
    images = []
    for i in range(n):
        red = (40 + 180 * x).expand(size, size)  # left-right gradient: a mirror reverses it
        green = (30 + 150 * y + 10 * i).expand(size, size)
        blue = 60 + 120 * (x * y) + 20 * i
        images.append(torch.stack([red, green, blue], -1))
    return torch.stack(images).round().clamp(0, 255).to(torch.uint8)


def view(images: torch.Tensor, config: ViewConfig, seed: int = 0, epoch: int = 0, rank: int = 0) -> torch.Tensor:
    return make_view(images, config, view_generator(seed, epoch, rank, "cpu"))


# --- determinism --------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [ViewConfig(), EVERYTHING], ids=["default", "everything"])
def test_same_seed_gives_bit_identical_views(config: ViewConfig) -> None:
    images = random_images()
    first, second = view(images, config, 3, 1, 0), view(images, config, 3, 1, 0)
    assert torch.equal(first, second)


@pytest.mark.parametrize("other", [dict(seed=1), dict(epoch=1), dict(rank=1)], ids=["seed", "epoch", "rank"])
def test_different_seed_epoch_or_rank_gives_different_views(other: dict) -> None:
    images = random_images()
    base = view(images, EVERYTHING, seed=0, epoch=0, rank=0)
    changed = view(images, EVERYTHING, **{"seed": 0, "epoch": 0, "rank": 0, **other})
    assert not torch.allclose(base, changed, atol=1e-3)


def test_generator_streams_differ_across_seed_epoch_rank() -> None:
    draws = {
        key: torch.rand(8, generator=view_generator(*key, "cpu")).tolist()
        for key in [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (0, 1, 1)]
    }
    assert len({tuple(d) for d in draws.values()}) == len(draws)


def test_two_views_from_one_generator_differ() -> None:
    # SimCLR draws both views from the same generator: they must be two different augmentations.
    images = random_images()
    generator = view_generator(0, 0, 0, "cpu")
    first, second = make_view(images, EVERYTHING, generator), make_view(images, EVERYTHING, generator)
    assert not torch.allclose(first, second, atol=1e-3)


def test_views_are_identical_across_processes() -> None:
    # Every Ray worker re-derives its generator: the same (seed, epoch, rank) must mean the same views
    # in another process, not just in this one.
    script = (
        "import hashlib, torch\n"
        "from selfsup.config import ViewConfig\n"
        "from selfsup.data.views import make_view, view_generator\n"
        "generator = torch.Generator().manual_seed(0)\n"
        "images = torch.randint(0, 256, (6, 16, 16, 3), dtype=torch.uint8, generator=generator)\n"
        "v = make_view(images, ViewConfig(), view_generator(5, 2, 1, 'cpu'))\n"
        "print(hashlib.sha256(v.numpy().tobytes()).hexdigest())\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    here = view(random_images(), ViewConfig(), seed=5, epoch=2, rank=1)
    assert result.stdout.strip() == hashlib.sha256(here.numpy().tobytes()).hexdigest()


# --- output contract ------------------------------------------------------------------------------


@pytest.mark.parametrize("n, size", [(1, 16), (5, 8), (3, 32)])
@pytest.mark.parametrize("config", [ViewConfig(), EVERYTHING, IDENTITY], ids=["default", "everything", "identity"])
def test_output_shape_dtype_and_range(n: int, size: int, config: ViewConfig) -> None:
    images = random_images(n, size)
    before = images.clone()
    out = view(images, config)
    assert out.shape == (n, 3, size, size)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert torch.equal(images, before)  # the stored batch is not modified


def test_extreme_images_stay_in_range() -> None:
    # All-black and all-white images push jitter and solarize to their limits.
    images = torch.cat([torch.zeros(2, 16, 16, 3), torch.full((2, 16, 16, 3), 255.0)]).to(torch.uint8)
    for seed in range(5):
        out = view(images, EVERYTHING, seed=seed)
        assert out.min() >= 0.0 and out.max() <= 1.0


def test_to_float_images_layout() -> None:
    images = random_images(2, 8)
    out = to_float_images(images)
    assert out.shape == (2, 3, 8, 8) and out.dtype == torch.float32
    assert torch.equal(out[1, 2, 3, 4], images[1, 3, 4, 2].float() / 255.0)


def test_default_views_change_the_image() -> None:
    images = smooth_images()
    assert not torch.allclose(view(images, ViewConfig()), to_float_images(images), atol=0.05)


# --- each augmentation ----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_no_augmentation_returns_the_image(seed: int) -> None:
    images = smooth_images(8)
    out = view(images, IDENTITY, seed=seed)
    assert torch.allclose(out, to_float_images(images), atol=0.02)


def test_crop_area_is_at_least_crop_scale_low_end_sanity() -> None:
    # A constant image is unchanged by any crop and resample: whatever the bug above, values survive.
    images = torch.full((4, 16, 16, 3), 77, dtype=torch.uint8)
    out = view(images, IDENTITY)
    assert torch.allclose(out, torch.full_like(out, 77 / 255), atol=1e-5)


def test_flip_mirrors_the_view() -> None:
    # Same generator stream, flip probability 1 vs 0: identical crops, one mirrored left-right.
    images = smooth_images(6)
    flipped = view(images, IDENTITY.model_copy(update={"flip_prob": 1.0}), seed=2)
    plain = view(images, IDENTITY, seed=2)
    assert torch.allclose(flipped, plain.flip(-1), atol=1e-5)
    assert not torch.allclose(flipped, plain, atol=0.05)  # the images are asymmetric: a flip shows


def test_flip_with_full_crop_mirrors_the_image() -> None:
    images = smooth_images(8)
    out = view(images, IDENTITY.model_copy(update={"flip_prob": 1.0}))
    assert torch.allclose(out, to_float_images(images).flip(-1), atol=0.02)


def test_flip_probability_is_per_image() -> None:
    images = smooth_images(1).expand(64, -1, -1, -1).contiguous()
    config = IDENTITY.model_copy(update={"flip_prob": 0.5})
    out = view(images, config, seed=1)
    red = out[:, 0]  # left-right gradient: a flipped image is darker on the right than on the left
    mirrored = red[:, :, -1].mean(1) < red[:, :, 0].mean(1)
    assert 10 <= int(mirrored.sum()) <= 54


def test_grayscale_gives_equal_channels() -> None:
    images = random_images(5, 16)
    out = view(images, ViewConfig(grayscale_prob=1.0, jitter_prob=0.0, flip_prob=0.5))
    assert torch.allclose(out[:, 0], out[:, 1], atol=1e-6)
    assert torch.allclose(out[:, 1], out[:, 2], atol=1e-6)
    colour = view(images, ViewConfig(grayscale_prob=0.0, jitter_prob=0.0))
    assert not torch.allclose(colour[:, 0], colour[:, 1], atol=1e-3)


def test_grayscale_uses_luma_weights() -> None:
    images = torch.zeros(1, 8, 8, 3, dtype=torch.uint8)
    images[..., 0] = 255  # pure red: luma 0.299
    out = view(images, IDENTITY.model_copy(update={"grayscale_prob": 1.0}))
    assert torch.allclose(out, torch.full_like(out, 0.299), atol=1e-4)


def test_jitter_changes_colours_only_when_enabled() -> None:
    images = smooth_images(4)
    plain = view(images, IDENTITY, seed=4)
    jittered = view(images, IDENTITY.model_copy(update={"jitter_prob": 1.0, "jitter_strength": 0.8}), seed=4)
    assert not torch.allclose(plain, jittered, atol=0.02)


def test_solarize_inverts_bright_pixels() -> None:
    images = torch.full((2, 8, 8, 3), 230, dtype=torch.uint8)
    out = view(images, IDENTITY.model_copy(update={"solarize_prob": 1.0}))
    assert torch.allclose(out, torch.full_like(out, 1 - 230 / 255), atol=1e-5)


def test_blur_smooths_and_keeps_the_mean() -> None:
    images = random_images(4, 32)
    plain = view(images, IDENTITY, seed=0)
    blurred = view(images, IDENTITY.model_copy(update={"blur_prob": 1.0}), seed=0)
    assert blurred.std() < plain.std()  # noise is smoothed
    assert torch.allclose(blurred.mean((2, 3)), plain.mean((2, 3)), atol=0.03)


@pytest.mark.parametrize("n, size", [(1, 8), (4, 32)])
def test_blur_output_contract(n: int, size: int) -> None:
    images = random_images(n, size)
    first, second = view(images, WITH_BLUR, seed=1), view(images, WITH_BLUR, seed=1)
    assert torch.equal(first, second)
    assert first.shape == (n, 3, size, size) and first.dtype == torch.float32
    assert first.min() >= 0.0 and first.max() <= 1.0


def test_blur_of_a_constant_image_is_the_same_constant() -> None:
    images = torch.full((3, 16, 16, 3), 100, dtype=torch.uint8)
    out = view(images, IDENTITY.model_copy(update={"blur_prob": 1.0}))
    assert torch.allclose(out, torch.full_like(out, 100 / 255), atol=1e-5)
