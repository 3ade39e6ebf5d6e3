"""Batched, seeded view augmentations that run on the training device.

One call turns a batch of uint8 images into an augmented float view of the whole batch: crop and flip
through a single affine `grid_sample` straight to the view's output size, colour jitter as one per-image
3x3 colour matrix, grayscale, blur and solarize as masked tensor ops at that size. Crop boxes are drawn
exactly as torchvision's `RandomResizedCrop.get_params` draws them (so public recipes' crop scales mean
the same here), vectorised over the batch. No per-image Python and no PIL, so on a GPU the CPU never
becomes the bottleneck. Randomness comes from an explicit generator: the same seed gives the same views.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from selfsup.config import ViewConfig

# ITU-R 601 luma weights, as torchvision's rgb_to_grayscale uses.
_LUMA = torch.tensor([0.299, 0.587, 0.114])
# RandomResizedCrop's defaults: aspect ratios (width / height) of the crop, and tries before its fallback.
_CROP_RATIO = (3 / 4, 4 / 3)
_CROP_TRIES = 10


@dataclass(frozen=True)
class ViewSpec:
    """One view a method asks for: its augmentations (crop scale included) and its output side."""

    config: ViewConfig
    size: int | None = None  # output height and width in pixels; None keeps the input's


def make_views(images: torch.Tensor, specs: list[ViewSpec], generator: torch.Generator) -> list[torch.Tensor]:
    """The views a method declared, in its order, each from the same uint8 batch."""
    return [make_view(images, spec.config, generator, spec.size) for spec in specs]


def view_generator(seed: int, epoch: int, rank: int, device: torch.device | str) -> torch.Generator:
    """A generator seeded by (seed, epoch, rank): every worker and epoch draws different, repeatable views."""
    generator = torch.Generator(device=device)
    generator.manual_seed(hash((seed, epoch, rank)) & 0x7FFF_FFFF_FFFF_FFFF)
    return generator


def to_float_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 N x H x W x 3 (as stored) -> float N x 3 x H x W in [0, 1]."""
    return images.permute(0, 3, 1, 2).float().div_(255.0)


def make_view(
    images: torch.Tensor, config: ViewConfig, generator: torch.Generator, size: int | None = None
) -> torch.Tensor:
    """One augmented view of a batch: uint8 N x H x W x 3 -> float N x 3 x size x size in [0, 1]
    (N x 3 x H x W when size is None). Everything after the crop runs at the output size."""
    x = to_float_images(images)
    n, device = x.shape[0], x.device

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return torch.rand(n, *shape, device=device, generator=generator) * (high - low) + low

    def coin(p: float) -> torch.Tensor:
        return torch.rand(n, device=device, generator=generator) < p

    boxes = _crop_boxes(n, x.shape[2], x.shape[3], config.crop_scale, generator, device)
    flip = coin(config.flip_prob)
    out_height, out_width = (x.shape[2], x.shape[3]) if size is None else (size, size)
    x = _resample_boxes(x, boxes, flip, out_height, out_width)
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
        blurred = _gaussian_blur(x, uniform(0.1, 2.0))  # kernel sized from the output, as it is applied after
        x = torch.where(coin(config.blur_prob).view(n, 1, 1, 1), blurred, x)
    if config.solarize_prob > 0:
        x = torch.where(coin(config.solarize_prob).view(n, 1, 1, 1) & (x >= 0.5), 1 - x, x)
    return x


def _luma(x: torch.Tensor) -> torch.Tensor:
    return (x * _LUMA.to(x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)


Boxes = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # (top, left, height, width) in pixels


def _crop_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    generator: torch.Generator,
    device: torch.device | str,
    ratio: tuple[float, float] = _CROP_RATIO,
) -> Boxes:
    """n crop boxes (i, j, h, w) of a height x width image, int64 tensors of shape (n,), drawn as
    torchvision's RandomResizedCrop.get_params draws one: the first of 10 tries whose box fits, else a
    central crop. All tries of all images are drawn at once (without host syncs)."""
    area = height * width
    # Float64, as get_params' Python arithmetic, so rounding to whole pixels behaves as torchvision's.
    draws = torch.rand(2, n, _CROP_TRIES, device=device, generator=generator, dtype=torch.float64)
    target_area = area * (scale[0] + (scale[1] - scale[0]) * draws[0])
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_low + (log_high - log_low) * draws[1])
    try_w = torch.round(torch.sqrt(target_area * aspect)).long()  # half to even, as Python's round
    try_h = torch.round(torch.sqrt(target_area / aspect)).long()
    fits = (try_w > 0) & (try_w <= width) & (try_h > 0) & (try_h <= height)
    tries = torch.arange(_CROP_TRIES, device=device)
    first = torch.where(fits, tries, _CROP_TRIES).amin(1, keepdim=True)  # _CROP_TRIES where none fits
    found = first.squeeze(1) < _CROP_TRIES
    first = first.clamp(max=_CROP_TRIES - 1)
    w = torch.where(found, try_w.gather(1, first).squeeze(1), 0)
    h = torch.where(found, try_h.gather(1, first).squeeze(1), 0)

    # Fallback: the whole image, or its central crop at the nearest allowed aspect ratio.
    in_ratio = width / height
    if in_ratio < min(ratio):
        fallback_w, fallback_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fallback_w, fallback_h = int(round(height * max(ratio))), height
    else:
        fallback_w, fallback_h = width, height
    w = torch.where(found, w, fallback_w)
    h = torch.where(found, h, fallback_h)

    # Offsets uniform over the integer positions that keep the box inside (torch.randint(0, H - h + 1));
    # the fallback is centred. The clamp guards a product that rounds up to the bound.
    offsets = torch.rand(2, n, device=device, generator=generator, dtype=torch.float64)
    i = torch.floor(offsets[0] * (height - h + 1)).long().minimum(height - h)
    j = torch.floor(offsets[1] * (width - w + 1)).long().minimum(width - w)
    i = torch.where(found, i, (height - fallback_h) // 2)
    j = torch.where(found, j, (width - fallback_w) // 2)
    return i, j, h, w


def _resample_boxes(x: torch.Tensor, boxes: Boxes, flip: torch.Tensor, out_height: int, out_width: int) -> torch.Tensor:
    """Each image's pixel box [j, j + w) x [i, i + h), mirrored left-right where flip, resampled bilinearly to
    out_height x out_width in one grid_sample."""
    n, _, height, width = x.shape
    i, j, h, w = (b.to(x.dtype) for b in boxes)
    # With align_corners=False, -1 and 1 are the outer edges of the first and last pixels: the output's
    # edges [-1, 1] map to the box's edges 2 * [j, j + w) / W - 1. A flip negates the scale about the centre.
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = torch.where(flip, -w, w) / width
    theta[:, 0, 2] = (2 * j + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * i + h) / height - 1
    grid = F.affine_grid(theta, [n, x.shape[1], out_height, out_width], align_corners=False)
    # Samples stay within half a pixel of the box, so reflection only ever clamps to the edge pixel.
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
    if min(h, w) < 2:
        return x  # a one-pixel view has nothing to blur (and reflect padding needs two pixels)
    size = max(3, int(0.1 * min(h, w)) | 1)
    offsets = torch.arange(size, device=x.device, dtype=x.dtype) - size // 2
    kernel = torch.exp(-(offsets**2) / (2 * sigma.view(n, 1) ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # one row per (image, channel)
    flat = x.reshape(1, n * c, h, w)
    pad = size // 2
    flat = F.conv2d(F.pad(flat, (pad, pad, 0, 0), mode="reflect"), kernel.view(n * c, 1, 1, size), groups=n * c)
    flat = F.conv2d(F.pad(flat, (0, 0, pad, pad), mode="reflect"), kernel.view(n * c, 1, size, 1), groups=n * c)
    return flat.view(n, c, h, w)
