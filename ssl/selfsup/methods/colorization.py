"""Colorization (Zhang, Isola & Efros, 2016): predict an image's colours (the ab of CIE Lab) from its lightness (L).

A pretext task: the target is the image's own colour. The encoder sees only the lightness, as the sRGB gray
image of the same L (R = G = B, the luminance Y kept), so the one encoder every evaluation feeds RGB images to
is the one trained. What that implies: trained on gray inputs only, the first layer never learns how to answer
colour; the part of its weights only colour would excite keeps its random initial value (shrunk by weight
decay). So at evaluation an RGB image gives its gray version's features plus what those untrained weights
add; a gray image gives exactly what training saw. On a grayscale dataset (the embedded digits, which colour
jitter keeps gray) ab is 0 everywhere: the target is constant and the task teaches the encoder nothing, so the
method declares `needs_colour` and the pretrain stage stops, before any compute, on a dataset of gray images.

The paper predicts, per pixel, a distribution over Q = 313 in-gamut ab bins of grid size 10 from a conv net's
feature map. Our encoder returns pooled features, so an MLP head predicts a coarse grid of cells instead
(`cell_size` px at the dataset's side: 4 x 4 cells of a 16 px image, 8 x 8 of 32 px), each cell's target being
the mean of its pixels' soft encodings: the histogram of the cell's colours, which keeps a red-and-green cell
from reading as brown. Soft encoding as the paper's: the 5 nearest bins, weighted by a Gaussian of sigma 5.
Our bins are the grid-10 cells some sRGB colour falls in (261; the paper's 313 are the grid points inside the
convex hull of its gamut). The paper's class rebalancing serves vivid colourisations, not features, and is
left out. Classification is the default: the paper's, and Split-Brain Autoencoders (Zhang et al., 2017)
found it gives better features than L2 regression, which averages a multimodal colour into gray;
`loss: regression` is that baseline, the L2 error of each cell's mean ab (in units of 100).
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from selfsup.config import MethodKnobs
from selfsup.data.lab import lightness_image, rgb_to_lab
from selfsup.methods.base import Method
from selfsup.methods.common import one_view
from selfsup.models.heads import mlp

BIN_SIZE, NEIGHBOURS, SIGMA = 10.0, 5, 5.0  # the paper's ab grid and soft encoding
CANDIDATES = 8  # bins looked up per whole-unit ab, among which soft encoding finds the NEIGHBOURS nearest
AB_RANGE = 110  # every sRGB colour's |a| and |b| stay below it (pure blue's b is -107.9)
AB_SCALE = 100.0  # regression targets in units of 100


@functools.cache
def gamut_bins(levels: int = 64) -> torch.Tensor:
    """The ab bins (Q x 2, their centres) of the grid-10 cells that some sRGB colour falls in, found on a
    levels^3 grid of the RGB cube (finer grids add no bin)."""
    values = torch.linspace(0, 1, levels, dtype=torch.float64)
    colours = torch.cartesian_prod(values, values, values).T.reshape(3, -1, 1)  # 3 x levels^3 x 1 "image"
    ab = rgb_to_lab(colours)[1:].reshape(2, -1).T
    return torch.unique(torch.round(ab / BIN_SIZE), dim=0).float() * BIN_SIZE


@functools.cache
def candidate_table() -> torch.Tensor:
    """The CANDIDATES bins nearest to each whole-unit ab of the plane [-AB_RANGE, AB_RANGE]^2, row by row:
    (2 AB_RANGE + 1)^2 x CANDIDATES. Looked up, soft encoding costs O(pixels), not O(pixels x Q)."""
    axis = torch.arange(-AB_RANGE, AB_RANGE + 1, dtype=torch.float32)
    return torch.cdist(torch.cartesian_prod(axis, axis), gamut_bins()).topk(CANDIDATES, largest=False).indices


def soft_encode(ab: torch.Tensor, bins: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """... x 2 ab values -> (... x NEIGHBOURS bin indices, their weights, summing to 1): the paper's soft
    encoding, the NEIGHBOURS nearest bins weighted by a Gaussian (sigma SIGMA) of their distance. They are
    picked among the candidates of ab rounded to whole units, which on in-gamut colours finds the exact five
    but for near-ties of the fifth (0.5%), and the nearest always."""
    a, b = (torch.round(ab).clamp(-AB_RANGE, AB_RANGE).long() + AB_RANGE).unbind(-1)
    candidates = table[a * (2 * AB_RANGE + 1) + b]
    squared = ((bins[candidates] - ab.unsqueeze(-2)) ** 2).sum(-1)
    nearest, which = squared.topk(NEIGHBOURS, dim=-1, largest=False)
    return candidates.gather(-1, which), torch.softmax(-nearest / (2 * SIGMA**2), dim=-1)


def pixel_cells(n: int, height: int, width: int, grid: int, device: torch.device) -> torch.Tensor:
    """N x H x W: each pixel's cell, numbered over the batch (image i's cells are i grid^2 .. (i + 1) grid^2 - 1),
    the cells a grid x grid partition of the image (all alike when grid divides the side)."""
    rows = torch.arange(height, device=device) * grid // height
    cols = torch.arange(width, device=device) * grid // width
    image = torch.arange(n, device=device).view(n, 1, 1) * grid**2
    return image + (rows.view(-1, 1) * grid + cols).unsqueeze(0)


def cell_means(lab: torch.Tensor, grid: int, slots: torch.Tensor, values: torch.Tensor, depth: int) -> torch.Tensor:
    """N x grid^2 x depth: the mean over each cell's pixels of a vector of `depth` slots, each pixel's given
    sparsely, as `values` added at `slots` (both N x H x W x K)."""
    n, _, height, width = lab.shape
    cells = pixel_cells(n, height, width, grid, lab.device)
    index = (cells.unsqueeze(-1) * depth + slots).flatten()
    sums = values.new_zeros(n * grid**2 * depth).index_add_(0, index, values.flatten())
    pixels = torch.bincount(cells.flatten(), minlength=n * grid**2)
    return (sums.view(-1, depth) / pixels.unsqueeze(1)).view(n, grid**2, depth)


def cell_histograms(lab: torch.Tensor, grid: int, bins: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """N x 3 x H x W Lab -> N x grid^2 x Q: each cell's colour histogram, the mean of its pixels' soft encodings
    (classification's targets)."""
    which, weights = soft_encode(lab[:, 1:].permute(0, 2, 3, 1), bins, table)
    return cell_means(lab, grid, which, weights, len(bins))


def cell_mean_ab(lab: torch.Tensor, grid: int) -> torch.Tensor:
    """N x 3 x H x W Lab -> N x grid^2 x 2: each cell's mean ab / AB_SCALE (regression's targets)."""
    ab = lab[:, 1:].permute(0, 2, 3, 1) / AB_SCALE
    return cell_means(lab, grid, torch.arange(2, device=lab.device).expand_as(ab), ab, 2)


def colorization_loss(prediction: torch.Tensor, targets: torch.Tensor, classification: bool) -> torch.Tensor:
    """Cross-entropy against the cells' histograms (prediction: logits), or the mean squared error of their
    mean ab; prediction and targets are N x cells x (Q or 2)."""
    if classification:
        return F.cross_entropy(prediction.flatten(0, 1), targets.flatten(0, 1))
    return F.mse_loss(prediction, targets)


class Colorization(Method):
    name = "colorization"
    min_batch = 2  # BatchNorm in the head needs two images
    lr = 0.1  # per 256 images (SGD), as rotation's; the paper used Adam

    advice = "lower train.lr"
    # On gray images (the digits) ab is 0 everywhere: a constant target teaches nothing, and through the pipeline
    # left the digits' features below random init (docs/methods.md). The stage refuses such data.
    needs_colour = True

    class Knobs(MethodKnobs):
        loss: Literal["classification", "regression"] = "classification"  # over ab bins (the paper's) | L2 on ab
        cell_size: int = Field(default=4, ge=1)  # px of the dataset's side per predicted cell: 4 x 4 cells at 16 px
        head_hidden_dim: int = Field(default=512, ge=1)

    views = staticmethod(one_view)

    def __init__(self, encoder: nn.Module, knobs: Knobs):
        super().__init__()
        self.encoder, self.knobs = encoder, knobs
        self.classification = knobs.loss == "classification"
        # A fixed grid, whatever a view's side (views smaller than the dataset's get smaller cells).
        self.grid = max(1, encoder.image_size // knobs.cell_size)
        self.register_buffer("bins", gamut_bins().clone(), persistent=False)  # fixed: not in checkpoints
        self.register_buffer("table", candidate_table().clone(), persistent=False)
        self.outputs = len(self.bins) if self.classification else 2
        self.head = mlp(encoder.feature_dim, knobs.head_hidden_dim, self.grid**2 * self.outputs)

    def forward(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        images = views[0]
        with torch.autocast(images.device.type, enabled=False):  # the colour maths in float32
            lab = rgb_to_lab(images.float())
            if self.classification:
                targets = cell_histograms(lab, self.grid, self.bins, self.table)
            else:
                targets = cell_mean_ab(lab, self.grid)
            gray = lightness_image(images.float())
        features = self.encoder(gray)
        prediction = self.head(features).float().view(-1, self.grid**2, self.outputs)
        with torch.autocast(prediction.device.type, enabled=False):
            loss = colorization_loss(prediction, targets, self.classification)
        return loss, features.detach().float()
