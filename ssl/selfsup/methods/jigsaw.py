"""Jigsaw puzzles (Noroozi & Favaro, 2016): which of a fixed set of permutations shuffled an image's 3x3 tiles.

A pretext task: the label is the index of the permutation each image drew (uniformly, per image). The tiles
(methods/tiles.py: gaps and jitter) go through the encoder in one batched pass of 9N, each tile's features
through a shared Linear + BatchNorm + ReLU (the paper's fc6, VISSL's per-tile head), concatenated in the
shuffled order, then an MLP (fc7, fc8) scores the permutations. The set is VISSL's `max_avg` greedy choice
(its `generate_jigsaw_permutations.py`): from one permutation, drawn by a fixed seed, repeatedly add the one
of all 9! whose average Hamming distance to those chosen is the largest (ties: the first in lexicographic
order), so that permutations the network must tell apart differ in many tiles. `permutations`: VISSL's
smallest file, 100 (the paper's 1000 takes about a second to build).

Adapted to small images (tiles.py): 4 px tiles in 5 px cells at 16 px (1 px of jitter), 8 px in 10 px at
32 px (2 px), fed to the encoder at `tile_size` 4, their own side at 16 px: the encoder sees strokes at the
scale it meets in whole images. On the digits' val split tiles upsampled to 8 px did better on kNN, 4 px on
the linear probe, at half the cost (docs/methods.md). At 32 px set it to 8, the tiles' own side.
No per-tile normalisation (the paper's, against matching tiles by their mean and contrast): on the digits
a tile's ink is what tells the centre from a corner, and blank tiles have no contrast to normalise; the
gaps, jitter and grayscale views are the shortcut fixes kept.
"""

from __future__ import annotations

import functools
import itertools
import math

import torch
from pydantic import Field
from torch import nn

from selfsup.distributed import randint_per_image
from selfsup.methods.base import Method
from selfsup.methods.common import labelled_cross_entropy
from selfsup.methods.tiles import CELLS, TileKnobs, TileSide, grayed_view, jittered_tiles, resized, whole_image_features
from selfsup.models.heads import mlp


@functools.cache
def all_permutations(tiles: int) -> torch.Tensor:
    """tiles! x tiles: every permutation of 0..tiles-1, in lexicographic order (uint8, read only)."""
    return torch.tensor(list(itertools.permutations(range(tiles))), dtype=torch.uint8)


def max_avg_permutations(count: int, tiles: int = CELLS, seed: int = 0) -> torch.Tensor:
    """`count` x `tiles` permutations of 0..tiles-1, chosen greedily for the largest average Hamming distance."""
    candidates = all_permutations(tiles)
    if not 1 <= count <= len(candidates):
        raise ValueError(f"{count} permutations of {tiles} tiles: allowed 1 to {len(candidates)}")
    # placed[i, v, c]: whether candidate c puts tile v at position i. Looking up a choice's agreements with every
    # candidate (9 contiguous rows) is about 8x faster than comparing every candidate with it.
    placed = candidates.T.contiguous()[:, None] == torch.arange(tiles, dtype=torch.uint8)[None, :, None]
    positions = torch.arange(tiles)
    chosen = [int(torch.randint(len(candidates), (1,), generator=torch.Generator().manual_seed(seed)))]
    distance_sums = torch.zeros(len(candidates))  # to the permutations chosen so far; -inf once chosen
    while len(chosen) < count:
        agreements = placed[positions, candidates[chosen[-1]].long()].view(torch.uint8).sum(0, dtype=torch.uint8)
        distance_sums += tiles - agreements
        distance_sums[chosen[-1]] = -math.inf
        chosen.append(int(distance_sums.argmax()))  # the first of the largest
    return candidates[chosen].long()


def shuffled(tiles: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
    """N x 9 x ... tiles put in N x 9 orders: position i of image n holds its tile of cell orders[n, i]."""
    return tiles[torch.arange(len(tiles), device=tiles.device)[:, None], orders]


class Jigsaw(Method):
    name = "jigsaw"
    min_batch = 2  # BatchNorm in the heads needs two images
    # Per 256 images (SGD). VISSL's 0.1, and 0.03 on the linear probe, left the encoder below random init on the
    # digits; at 0.01 it is above on both protocols (docs/methods.md).
    lr = 0.01

    advice = "lower train.lr or method.jigsaw.permutations"

    class Knobs(TileKnobs):
        permutations: int = Field(default=100, ge=2, le=math.factorial(CELLS))
        tile_size: TileSide = 4
        tile_dim: int = Field(default=256, ge=1)  # each tile's features (fc6; the paper's 1024)
        head_hidden_dim: int = Field(default=1024, ge=1)  # over the nine concatenated (fc7; the paper's 4096)

    views = staticmethod(grayed_view)

    def __init__(self, encoder: nn.Module, knobs: Knobs):
        super().__init__()
        self.encoder, self.knobs = encoder, knobs
        self.register_buffer("permutations", max_avg_permutations(knobs.permutations))
        self.tile_head = nn.Sequential(
            nn.Linear(encoder.feature_dim, knobs.tile_dim, bias=False), nn.BatchNorm1d(knobs.tile_dim), nn.ReLU()
        )
        self.head = mlp(CELLS * knobs.tile_dim, knobs.head_hidden_dim, knobs.permutations)

    def forward(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        images = views[0]
        labels = randint_per_image(len(self.permutations), len(images), images.device)
        tiles = shuffled(jittered_tiles(images, self.knobs.tile_fraction), self.permutations[labels])
        features = self.encoder(resized(tiles.flatten(0, 1), self.knobs.tile_size))  # all 9N tiles, one pass
        loss = labelled_cross_entropy(self.head, self.tile_head(features).view(len(images), -1), labels)
        return loss, whole_image_features(self.encoder, images)
