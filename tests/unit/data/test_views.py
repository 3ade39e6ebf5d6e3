"""Batched, seeded view augmentations: determinism, output contract, crop boxes as torchvision draws them,
and each augmentation's effect."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from torchvision.transforms import RandomResizedCrop

from selfsup.config import ViewConfig
from selfsup.data.views import (
    ViewSpec,
    _crop_boxes,
    _resample_boxes,
    make_view,
    make_views,
    to_float_images,
    view_generator,
)
from tests.conftest import ROOT

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


def view(
    images: torch.Tensor, config: ViewConfig, seed: int = 0, epoch: int = 0, rank: int = 0, size: int | None = None
) -> torch.Tensor:
    return make_view(images, config, view_generator(seed, epoch, rank, "cpu"), size)


def ks_statistic(first: np.ndarray, second: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs (ties included)."""
    first, second = np.sort(first), np.sort(second)
    points = np.concatenate([first, second])
    cdf_first = np.searchsorted(first, points, side="right") / len(first)
    cdf_second = np.searchsorted(second, points, side="right") / len(second)
    return float(np.abs(cdf_first - cdf_second).max())


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


@pytest.mark.parametrize(
    "config", [ViewConfig(), EVERYTHING, WITH_BLUR, IDENTITY], ids=["default", "all", "blur", "id"]
)
@pytest.mark.parametrize("size", [18, 8, 32, 40])
def test_output_size(config: ViewConfig, size: int) -> None:
    images = random_images(5, 32)
    out = view(images, config, size=size)
    assert out.shape == (5, 3, size, size) and out.dtype == torch.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert torch.equal(out, view(images, config, size=size))


def test_size_none_keeps_the_input_size() -> None:
    images = random_images(3, 24)
    assert view(images, EVERYTHING, size=None).shape == (3, 3, 24, 24)
    assert torch.equal(view(images, EVERYTHING, size=None), view(images, EVERYTHING))


def test_whole_image_at_a_smaller_size_is_the_resized_image() -> None:
    # Halving a smooth image: each output pixel is the mean of a 2 x 2 block (bilinear at the block centre).
    images = smooth_images(4, 32)
    out = view(images, IDENTITY, size=16)
    expected = torch.nn.functional.avg_pool2d(to_float_images(images), 2)
    assert torch.allclose(out, expected, atol=1e-5)


def test_make_views_follows_the_specs() -> None:
    # Multi-crop: two global views at the input size, six local views at 18 px.
    images = random_images(4, 32)
    local = EVERYTHING.model_copy(update={"crop_scale": (0.05, 0.4)})
    specs = [ViewSpec(EVERYTHING), ViewSpec(EVERYTHING, 32)] + [ViewSpec(local, 18)] * 6
    views = make_views(images, specs, view_generator(0, 0, 0, "cpu"))
    assert [v.shape for v in views] == [(4, 3, 32, 32)] * 2 + [(4, 3, 18, 18)] * 6
    again = make_views(images, specs, view_generator(0, 0, 0, "cpu"))
    assert all(torch.equal(a, b) for a, b in zip(views, again))
    assert not torch.allclose(views[2], views[3], atol=1e-3)  # local views are different crops


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_views_on_cuda() -> None:
    images = random_images(8, 32).cuda()
    first = make_view(images, WITH_BLUR, view_generator(0, 0, 0, "cuda"), 18)
    second = make_view(images, WITH_BLUR, view_generator(0, 0, 0, "cuda"), 18)
    other = make_view(images, WITH_BLUR, view_generator(1, 0, 0, "cuda"), 18)
    assert first.device.type == "cuda" and first.shape == (8, 3, 18, 18)
    assert torch.equal(first, second) and not torch.allclose(first, other, atol=1e-3)
    assert first.min() >= 0.0 and first.max() <= 1.0
    identity = make_view(images, IDENTITY, view_generator(0, 0, 0, "cuda"))
    assert torch.allclose(identity, to_float_images(images), atol=1e-5)


# --- crop boxes -----------------------------------------------------------------------------------


def torchvision_boxes(n: int, side: int, scale: tuple[float, float]) -> np.ndarray:
    """n boxes (i, j, h, w) from torchvision's RandomResizedCrop.get_params, seeded, global RNG untouched."""
    image = torch.empty(3, side, side)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return np.array([RandomResizedCrop.get_params(image, list(scale), [3 / 4, 4 / 3]) for _ in range(n)])


def our_boxes(n: int, height: int, width: int, scale: tuple[float, float], seed: int = 0, **kwargs) -> np.ndarray:
    boxes = _crop_boxes(n, height, width, scale, torch.Generator().manual_seed(seed), "cpu", **kwargs)
    return torch.stack(boxes, 1).numpy()


@pytest.mark.parametrize("scale", [(0.08, 1.0), (0.4, 1.0)])
def test_crop_boxes_match_torchvision(scale: tuple[float, float]) -> None:
    n, side = 20_000, 32
    ours, theirs = our_boxes(n, side, side, scale), torchvision_boxes(n, side, scale)
    area_ours = ours[:, 2] * ours[:, 3] / side**2
    area_theirs = theirs[:, 2] * theirs[:, 3] / side**2
    assert abs(area_ours.mean() - area_theirs.mean()) < 0.01
    assert abs((area_ours > 0.8).mean() - (area_theirs > 0.8).mean()) < 0.02
    assert ks_statistic(area_ours, area_theirs) < 0.025  # 0.1% critical value at 20k vs 20k: ~0.0195
    aspect_ours, aspect_theirs = np.log(ours[:, 3] / ours[:, 2]), np.log(theirs[:, 3] / theirs[:, 2])
    assert abs(aspect_ours.mean() - aspect_theirs.mean()) < 0.01
    assert ks_statistic(aspect_ours, aspect_theirs) < 0.025
    # Offsets: uniform over the positions left, as torchvision's: their mean is half the slack.
    for offset, extent in [(0, 2), (1, 3)]:
        slack_ours, slack_theirs = side - ours[:, extent], side - theirs[:, extent]
        assert abs((ours[:, offset] - slack_ours / 2).mean()) < 0.1
        assert abs((theirs[:, offset] - slack_theirs / 2).mean()) < 0.1


def test_default_crops_are_not_larger_than_torchvision() -> None:
    # The default crop_scale (0.4, 1): mean area 0.65 (a uniform area would give 0.70), about 19% above 0.8.
    boxes = our_boxes(20_000, 32, 32, (0.4, 1.0))
    area = boxes[:, 2] * boxes[:, 3] / 32**2
    assert 0.64 < area.mean() < 0.66
    assert 0.16 < (area > 0.8).mean() < 0.21


@pytest.mark.parametrize("height, width", [(32, 32), (16, 40), (40, 16), (7, 9), (1, 1)])
@pytest.mark.parametrize("scale", [(0.08, 1.0), (0.4, 1.0), (0.05, 0.4), (1.0, 1.0)])
def test_crop_boxes_lie_inside_the_image(height: int, width: int, scale: tuple[float, float]) -> None:
    i, j, h, w = our_boxes(5_000, height, width, scale).T
    assert (h >= 1).all() and (w >= 1).all()
    assert (i >= 0).all() and (j >= 0).all()
    assert (i + h <= height).all() and (j + w <= width).all()


def test_crop_boxes_fall_back_like_torchvision() -> None:
    # A 10 x 40 image at full scale: no try fits, so every box is the central crop at ratio 4/3.
    expected = RandomResizedCrop.get_params(torch.empty(3, 10, 40), [1.0, 1.0], [3 / 4, 4 / 3])
    assert expected == (0, 13, 10, 13)
    assert (our_boxes(100, 10, 40, (1.0, 1.0)) == np.array(expected)).all()


@pytest.mark.parametrize("ratio", [(1.0, 1.0), (3 / 4, 4 / 3)], ids=["fixed", "default"])
@pytest.mark.parametrize("side", [32, 18, 5])
def test_full_scale_on_a_square_image_is_the_whole_image(ratio: tuple[float, float], side: int) -> None:
    # Any fitting try at full scale on a square image rounds to the whole image, and so does the fallback.
    boxes = our_boxes(1_000, side, side, (1.0, 1.0), ratio=ratio)
    assert (boxes == np.array([0, 0, side, side])).all()


def test_full_scale_fixed_ratio_on_a_non_square_image_is_the_whole_image() -> None:
    boxes = our_boxes(1_000, 20, 24, (1.0, 1.0), ratio=(24 / 20, 24 / 20))
    assert (boxes == np.array([0, 0, 20, 24])).all()


def test_crop_boxes_are_seeded() -> None:
    first, second = our_boxes(64, 32, 32, (0.08, 1.0), seed=3), our_boxes(64, 32, 32, (0.08, 1.0), seed=3)
    assert (first == second).all()
    assert not (first == our_boxes(64, 32, 32, (0.08, 1.0), seed=4)).all()


@pytest.mark.parametrize("flip", [False, True])
def test_resample_maps_the_pixel_box_exactly(flip: bool) -> None:
    # A box resampled at its own size is exactly those pixels (mirrored when flipped): no half-pixel shift.
    x = to_float_images(random_images(6, 32))
    n, side = x.shape[0], 12
    i, j = torch.tensor([0, 20, 5, 3, 11, 0]), torch.tensor([0, 20, 9, 17, 2, 20])
    boxes = (i, j, torch.full((n,), side), torch.full((n,), side))
    out = _resample_boxes(x, boxes, torch.full((n,), flip), side, side)
    for k in range(n):
        crop = x[k, :, i[k] : i[k] + side, j[k] : j[k] + side]
        assert torch.allclose(out[k], crop.flip(-1) if flip else crop, atol=1e-5)


def test_resample_non_square_box_to_square_output() -> None:
    # A 16-wide, 8-high box resampled to 8 x 8: columns average in pairs, rows are kept.
    x = to_float_images(smooth_images(2, 32))
    boxes = (torch.tensor([4, 10]), torch.tensor([0, 16]), torch.tensor([8, 8]), torch.tensor([16, 16]))
    out = _resample_boxes(x, boxes, torch.tensor([False, False]), 8, 8)
    for k in range(2):
        i, j = int(boxes[0][k]), int(boxes[1][k])
        crop = x[k, :, i : i + 8, j : j + 16]
        assert torch.allclose(out[k], (crop[..., 0::2] + crop[..., 1::2]) / 2, atol=1e-5)


# --- each augmentation ----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("make", [smooth_images, random_images], ids=["smooth", "random"])
def test_no_augmentation_returns_the_image(seed: int, make) -> None:
    # crop_scale (1, 1) gives the whole-image box; resampled at the input size it is the identity.
    images = make(8)
    out = view(images, IDENTITY, seed=seed)
    assert out.shape == (8, 3, *images.shape[1:3])
    assert torch.allclose(out, to_float_images(images), atol=1e-5)


def test_resample_of_a_constant_image_is_the_same_constant() -> None:
    # A constant image is unchanged by any crop and resample.
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
