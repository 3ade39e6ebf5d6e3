"""sRGB <-> CIE Lab (D65), batched on the channel dimension (dim -3) of float tensors: colorization's colour space."""

from __future__ import annotations

import torch

# sRGB (linear) -> CIE XYZ under D65 (IEC 61966-2-1); its rows' sums are D65's white point.
RGB_TO_XYZ = torch.tensor(
    [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]],
    dtype=torch.float64,
)
WHITE = RGB_TO_XYZ.sum(1)
XYZ_TO_RGB = torch.linalg.inv(RGB_TO_XYZ)
DELTA = 6 / 29  # where CIE's cube root gives way to its linear segment near black


def srgb_to_linear(c: torch.Tensor) -> torch.Tensor:
    return torch.where(c <= 0.04045, c / 12.92, ((c.clamp(min=0) + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(c: torch.Tensor) -> torch.Tensor:
    return torch.where(c <= 0.0031308, c * 12.92, 1.055 * c.clamp(min=0.0031308) ** (1 / 2.4) - 0.055)


def _mix(matrix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The k x 3 matrix applied to the channels (dim -3) of x: k channels out."""
    return torch.einsum("ij,...jhw->...ihw", matrix.to(x), x)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1], ... x 3 x H x W -> CIE Lab (D65): L in [0, 100], a and b within about +-110."""
    xyz = _mix(RGB_TO_XYZ, srgb_to_linear(rgb)) / WHITE.to(rgb).view(3, 1, 1)
    f = torch.where(xyz > DELTA**3, xyz.clamp(min=DELTA**3) ** (1 / 3), xyz / (3 * DELTA**2) + 4 / 29)
    fx, fy, fz = f.unbind(-3)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], -3)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """The inverse of rgb_to_lab; colours outside the sRGB gamut come out outside [0, 1] (not clipped)."""
    lightness, a, b = lab.unbind(-3)
    fy = (lightness + 16) / 116
    f = torch.stack([fy + a / 500, fy, fy - b / 200], -3)
    xyz = torch.where(f > DELTA, f**3, 3 * DELTA**2 * (f - 4 / 29)) * WHITE.to(lab).view(3, 1, 1)
    return linear_to_srgb(_mix(XYZ_TO_RGB, xyz))


def lightness_image(rgb: torch.Tensor) -> torch.Tensor:
    """The gray sRGB image of the same L: L depends on the luminance Y alone, so keep Y and set R = G = B.
    A gray image comes back as it is."""
    luminance = _mix(RGB_TO_XYZ[1:2], srgb_to_linear(rgb))
    return linear_to_srgb(luminance).expand_as(rgb)
