"""The 3x3 grid of tiles that the tile pretext tasks (jigsaw, relative patch location) cut from each image.

The grid's nine cells are `side // 3` px a side, centred in the image, numbered row-major (0 top-left, 4
the centre, 8 bottom-right). Each cell yields one tile `tile_fraction` of the cell's side, at a random
offset inside its cell (jitter: 0 to cell - tile px down and across, drawn per tile and per image), so
neighbouring tiles are 0 to 2 * (cell - tile) px apart: the papers' gap and jitter, against the shortcut
of matching low-level edges and textures across tile borders. VISSL's jigsaw and mmselfsup's relative
location cut 64 px tiles from 85 px cells (0.75, jitter 21 px); here the default 0.8 gives 4 px tiles in
5 px cells at 16 px (jitter 1 px) and 8 px tiles in 10 px cells at 32 px (jitter 2 px).

Tiles go to the encoder resized (bilinear) to each method's `tile_size` px, at least 4, which the small CNN's
two 2x max-pools need to leave a map at all, and a multiple of 4, which the ViTs' patches need.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field

from selfsup.config import MethodKnobs, ViewConfig
from selfsup.data.views import ViewSpec
from selfsup.distributed import rand_per_image

GRID = 3  # cells a side
CELLS = GRID * GRID


# The side tiles are resized to for the encoder: a multiple of 4, as the ViTs' patches need.
TileSide = Annotated[int, Field(ge=4, multiple_of=4)]


class TileKnobs(MethodKnobs):
    """What both tile tasks share: the tiles' geometry and the chromatic-aberration fix."""

    tile_fraction: float = Field(default=0.8, gt=0, le=1)  # a tile's side, of its cell's (1: no gap or jitter)
    grayscale_prob: float = Field(default=0.66, ge=0, le=1)  # of the whole view, as VISSL and mmselfsup


@dataclass(frozen=True)
class Grid:
    """Where the cells and tiles lie in an image, in pixels."""

    origin: int  # the first cell's top row (and left column)
    cell: int
    tile: int

    @property
    def jitter(self) -> int:
        """The largest offset of a tile inside its cell."""
        return self.cell - self.tile


def grid_for(side: int, tile_fraction: float) -> Grid:
    """The 3x3 grid centred in a side x side image (16 px: origin 0, cells 5, tiles 4 at 0.8)."""
    cell = side // GRID
    return Grid((side - GRID * cell) // 2, cell, max(1, round(cell * tile_fraction)))


def random_offsets(n: int, grid: Grid, device: torch.device | str) -> torch.Tensor:
    """N x 9 x 2 (down, across) offsets of each tile inside its cell, uniform in [0, grid.jitter]."""
    # Drawn for the global batch (rand_per_image): the tiles do not depend on how many workers share it.
    return (rand_per_image(n, CELLS, 2, device=device) * (grid.jitter + 1)).long()


def cut_tiles(images: torch.Tensor, grid: Grid, offsets: torch.Tensor) -> torch.Tensor:
    """N x C x H x W images -> N x 9 x C x tile x tile: cell k's tile at offsets[:, k] inside cell k."""
    cells = torch.arange(CELLS, device=images.device)
    corners = grid.origin + grid.cell * torch.stack([cells // GRID, cells % GRID], dim=1)  # 9 x 2 cell corners
    top, left = (corners + offsets).unbind(2)  # each N x 9
    windows = images.unfold(2, grid.tile, 1).unfold(3, grid.tile, 1)  # N x C x rows x cols x tile x tile, a view
    return windows[torch.arange(len(images), device=images.device)[:, None], :, top, left]


def jittered_tiles(images: torch.Tensor, tile_fraction: float) -> torch.Tensor:
    """The nine tiles of each square image (N x 9 x C x tile x tile), each at a fresh random offset."""
    grid = grid_for(images.shape[-1], tile_fraction)
    return cut_tiles(images, grid, random_offsets(len(images), grid, images.device))


def resized(tiles: torch.Tensor, size: int) -> torch.Tensor:
    """M x C x t x t tiles -> M x C x size x size, what the encoder takes."""
    return tiles if tiles.shape[-1] == size else F.interpolate(tiles, size=size, mode="bilinear", align_corners=False)


def grayed_view(knobs: TileKnobs, views: ViewConfig, image_size: int) -> list[ViewSpec]:
    """One view, grayscale with probability at least `knobs.grayscale_prob`: the papers' fix for chromatic
    aberration, a colour fringe that gives away where a tile lay in the lens's field."""
    return [ViewSpec(views.model_copy(update={"grayscale_prob": max(views.grayscale_prob, knobs.grayscale_prob)}))]


@torch.no_grad()
def whole_image_features(encoder: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The encoder's features of the untiled images, which the loop watches for collapse. In training mode
    this pass also feeds BatchNorm's running statistics, which evaluation uses on whole images."""
    return encoder(images).float()
