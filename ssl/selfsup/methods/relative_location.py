"""Relative patch location (Doersch et al., 2015, context prediction): where a tile lay relative to the centre.

A pretext task: from the 3x3 grid of tiles (methods/tiles.py: gaps and jitter) each image gives its centre
tile and one of the eight neighbours, drawn uniformly per image; the label says which, numbered row-major
around the centre, skipping it:

    0 1 2
    3 . 4
    5 6 7

Both tiles of every pair go through the encoder in one batched pass; the concatenation of their features
(centre first) goes through an MLP to the eight scores (mmselfsup's neck and head; the paper's late fusion
with fc6 per patch folded into it). Against trivial shortcuts: the gap and jitter between tiles (the
paper's 48 px gap and 7 px jitter at 96 px patches) and, for the paper's chromatic aberration, grayscale
views (`grayscale_prob` 0.66, as mmselfsup; a colour fringe that grows towards the image's edges would
otherwise give the position away). The paper's random down- and up-sampling of patches is left out.

Adapted to small images (tiles.py): 4 px tiles in 5 px cells at 16 px (1 px of jitter), 8 px in 10 px at
32 px (2 px), fed to the encoder at `tile_size` 8 (as BF3S resizes mini-ImageNet to 96 px for its 24 px
patches): upsampled 2x at 16 px, where the small CNN's two max-pools then leave a 2x2 map; at 32 px their
own side. On the digits' val split 8 px beat tiles upsampled to 16 on both protocols, at a quarter of the
cost (docs/methods.md).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from selfsup.distributed import randint_per_image
from selfsup.methods.base import Method
from selfsup.methods.common import labelled_cross_entropy
from selfsup.methods.tiles import TileKnobs, TileSide, grayed_view, jittered_tiles, resized, whole_image_features
from selfsup.models.heads import mlp

CENTRE = 4
NEIGHBOURS = (0, 1, 2, 3, 5, 6, 7, 8)  # label k -> the grid cell (row-major) of the k-th neighbour


def centre_and_neighbour(tiles: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """N x 9 x C x t x t tiles and N labels -> each image's centre tile and its neighbour tile `labels`."""
    cells = torch.tensor(NEIGHBOURS, device=tiles.device)[labels]
    return tiles[:, CENTRE], tiles[torch.arange(len(tiles), device=tiles.device), cells]


class RelativeLocation(Method):
    name = "relative_location"
    min_batch = 2  # BatchNorm in the head needs two images
    # Per 256 images (SGD). mmselfsup's (0.2 at batch 512), and 0.03 on the linear probe, left the encoder below
    # random init on the digits; at 0.01 it is above on both protocols (docs/methods.md).
    lr = 0.01

    advice = "lower train.lr"

    class Knobs(TileKnobs):
        tile_size: TileSide = 8
        head_hidden_dim: int = Field(default=1024, ge=1)  # over the concatenated pair (mmselfsup's 4096)

    views = staticmethod(grayed_view)

    def __init__(self, encoder: nn.Module, knobs: Knobs):
        super().__init__()
        self.encoder, self.knobs = encoder, knobs
        self.head = mlp(2 * encoder.feature_dim, knobs.head_hidden_dim, len(NEIGHBOURS))

    def forward(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        images = views[0]
        labels = randint_per_image(len(NEIGHBOURS), len(images), images.device)
        centre, neighbour = centre_and_neighbour(jittered_tiles(images, self.knobs.tile_fraction), labels)
        features = self.encoder(resized(torch.cat([centre, neighbour]), self.knobs.tile_size))  # one pass
        loss = labelled_cross_entropy(self.head, torch.cat(features.chunk(2), dim=1), labels)
        return loss, whole_image_features(self.encoder, images)
