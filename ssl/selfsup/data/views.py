"""Batched, seeded view augmentations that run on the training device.

One call turns a batch of uint8 images into an augmented float view of the whole batch: crop and flip
through a single affine `grid_sample`, colour jitter as one per-image 3x3 colour matrix, grayscale,
blur and solarize as masked tensor ops. No per-image Python and no PIL, so on a GPU the CPU never
becomes the bottleneck. Randomness comes from an explicit generator: the same seed gives the same views.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from selfsup.config import ViewConfig

# ITU-R 601 luma weights, as torchvision's rgb_to_grayscale uses.
_LUMA = torch.tensor([0.299, 0.587, 0.114])


def view_generator(seed: int, epoch: int, rank: int, device: torch.device | str) -> torch.Generator:
    """A generator seeded by (seed, epoch, rank): every worker and epoch draws different, repeatable views."""
    generator = torch.Generator(device=device)
    generator.manual_seed(hash((seed, epoch, rank)) & 0x7FFF_FFFF_FFFF_FFFF)
    return generator


def to_float_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 N x H x W x 3 (as stored) -> float N x 3 x H x W in [0, 1]."""
    return images.permute(0, 3, 1, 2).float().div_(255.0)


def make_view(images: torch.Tensor, config: ViewConfig, generator: torch.Generator) -> torch.Tensor:
    """One augmented view of a batch: uint8 N x H x W x 3 -> float N x 3 x H x W in [0, 1]."""
    x = to_float_images(images)
    n, device = x.shape[0], x.device

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return torch.rand(n, *shape, device=device, generator=generator) * (high - low) + low

    def coin(p: float) -> torch.Tensor:
        return torch.rand(n, device=device, generator=generator) < p

    x = _resized_crop_and_flip(x, config, uniform, coin)
    if config.jitter_prob > 0 and config.jitter_strength > 0:
        s = config.jitter_strength
        matrix = _jitter_matrix(uniform(1 - s, 1 + s), uniform(1 - s, 1 + s), uniform(-s / 4, s / 4))
        colored = torch.einsum("nij,njhw->nihw", matrix, x)  # brightness, saturation, hue at once
        mean = _luma(colored).mean((2, 3), keepdim=True)
        jittered = (colored - mean) * uniform(1 - s, 1 + s, 1, 1, 1) + mean  # contrast pivots on the mean
        x = torch.where(coin(config.jitter_prob).view(n, 1, 1, 1), jittered.clamp(0, 1), x)
    if config.grayscale_prob > 0:
        gray = _luma(x).expand_as(x)
        x = torch.where(coin(config.grayscale_prob).view(n, 1, 1, 1), gray, x)
    if config.blur_prob > 0:
        blurred = _gaussian_blur(x, uniform(0.1, 2.0))
        x = torch.where(coin(config.blur_prob).view(n, 1, 1, 1), blurred, x)
    if config.solarize_prob > 0:
        x = torch.where(coin(config.solarize_prob).view(n, 1, 1, 1) & (x >= 0.5), 1 - x, x)
    return x


def _luma(x: torch.Tensor) -> torch.Tensor:
    return (x * _LUMA.to(x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)


def _resized_crop_and_flip(x: torch.Tensor, config: ViewConfig, uniform, coin) -> torch.Tensor:
    """Random resized crop (area in crop_scale, aspect in [3/4, 4/3]) and horizontal flip, one resample."""
    n = x.shape[0]
    area = uniform(*config.crop_scale)
    log_ratio = uniform(math.log(3 / 4), math.log(4 / 3))
    # Bounding the ratio by the area keeps both sides within the image without shrinking the area.
    ratio = torch.exp(log_ratio).clamp(min=area, max=1 / area)
    width = torch.sqrt(area * ratio).clamp(max=1.0)  # fractions of the image side
    height = torch.sqrt(area / ratio).clamp(max=1.0)
    center_x = uniform(-1, 1) * (1 - width)  # in grid coordinates [-1, 1]: the crop stays inside
    center_y = uniform(-1, 1) * (1 - height)
    flip = torch.where(coin(config.flip_prob), -1.0, 1.0).to(x.device)
    theta = torch.zeros(n, 2, 3, device=x.device)
    theta[:, 0, 0] = width * flip
    theta[:, 0, 2] = center_x
    theta[:, 1, 1] = height
    theta[:, 1, 2] = center_y
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _jitter_matrix(brightness: torch.Tensor, saturation: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """Per-image 3x3 colour matrices: hue rotation in YIQ space, then saturation, then brightness."""
    device = brightness.device
    rgb_to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], device=device)
    yiq_to_rgb = torch.linalg.inv(rgb_to_yiq)
    angle = hue * 2 * math.pi
    cos, sin = torch.cos(angle), torch.sin(angle)
    one, zero = torch.ones_like(cos), torch.zeros_like(cos)
    # In YIQ, hue rotates (I, Q) and saturation scales them; brightness scales everything.
    rotate = torch.stack(
        [
            torch.stack([one, zero, zero], -1),
            torch.stack([zero, cos * saturation, -sin * saturation], -1),
            torch.stack([zero, sin * saturation, cos * saturation], -1),
        ],
        -2,
    )
    return brightness.view(-1, 1, 1) * (yiq_to_rgb @ rotate @ rgb_to_yiq)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with a different sigma per image (kernel ~10% of the side, as SimCLR)."""
    n, c, h, w = x.shape
    size = max(3, int(0.1 * min(h, w)) | 1)
    offsets = torch.arange(size, device=x.device, dtype=x.dtype) - size // 2
    kernel = torch.exp(-(offsets**2) / (2 * sigma.view(n, 1) ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # one row per (image, channel)
    flat = x.reshape(1, n * c, h, w)
    pad = size // 2
    flat = F.conv2d(F.pad(flat, (pad, pad, 0, 0), mode="reflect"), kernel.view(n * c, 1, 1, size), groups=n * c)
    flat = F.conv2d(F.pad(flat, (0, 0, pad, pad), mode="reflect"), kernel.view(n * c, 1, size, 1), groups=n * c)
    return flat.view(n, c, h, w)
