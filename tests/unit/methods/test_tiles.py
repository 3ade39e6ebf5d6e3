"""The tile pretext tasks (jigsaw, relative patch location): their permutations, tiles and labels are what the
papers define, and both learn their task and run under bf16 autocast."""

from __future__ import annotations

import itertools
import math

import pydantic
import pytest
import torch

from selfsup.config import ModelConfig, ViewConfig
from selfsup.methods.jigsaw import Jigsaw, max_avg_permutations, shuffled
from selfsup.methods.relative_location import NEIGHBOURS, RelativeLocation, centre_and_neighbour
from selfsup.methods.tiles import CELLS, Grid, cut_tiles, grid_for, jittered_tiles, random_offsets
from selfsup.models import Encoder
from tests.unit.methods.test_method_losses import TinyEncoder

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only add overhead


SMALL = {  # heads a few units wide, 10 permutations: each test well under a second
    Jigsaw: {"permutations": 10, "tile_dim": 16, "head_hidden_dim": 32},
    RelativeLocation: {"head_hidden_dim": 32},
}


def hamming(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise Hamming distances between the rows of a (A x T) and b (B x T): A x B."""
    return (a[:, None] != b[None]).sum(2)


def position_images(n: int, side: int) -> torch.Tensor:
    """N x 3 x side x side whose first channel is each pixel's row * side + column: a tile tells where it lay."""
    positions = torch.arange(side * side, dtype=torch.float32).view(side, side)
    return torch.stack([positions, positions.T, torch.zeros(side, side)]).expand(n, 3, side, side).clone()


def reassembled(tiles: torch.Tensor) -> torch.Tensor:
    """N x 9 x C x t x t tiles in row-major cell order -> the N x C x 3t x 3t image they tile."""
    n, _, c, t, _ = tiles.shape
    return tiles.view(n, 3, 3, c, t, t).permute(0, 3, 1, 4, 2, 5).reshape(n, c, 3 * t, 3 * t)


@pytest.fixture(scope="module")
def hundred() -> torch.Tensor:
    """VISSL's smallest set, built once (about a second)."""
    return max_avg_permutations(100)


def test_the_permutations_are_distinct_deterministic_permutations_of_the_nine_tiles(hundred):
    permutations = hundred
    assert permutations.shape == (100, CELLS) and permutations.dtype == torch.long
    assert torch.equal(permutations.sort(1).values, torch.arange(CELLS).expand(100, CELLS))
    assert len(set(map(tuple, permutations.tolist()))) == 100
    assert torch.equal(max_avg_permutations(20), permutations[:20])  # the fixed seed: the same set every build
    assert not torch.equal(max_avg_permutations(1, seed=1)[0], permutations[0])  # the seed draws the first


def test_the_greedy_set_has_the_papers_average_hamming_distance(hundred):
    """The 100 greedy max-average permutations are 8.08 tiles apart on average (of 9; 1000 of them: 8.00), yet
    two of them differ in only 2 tiles, a swap: max_avg raises the average, not the minimum."""
    distances = hamming(hundred, hundred).float()
    assert round(distances.sum().item() / (100 * 99), 2) == 8.08
    assert distances.fill_diagonal_(math.inf).min() == 2


def test_each_added_permutation_has_the_largest_average_distance_brute_forced_on_four_tiles():
    chosen = max_avg_permutations(12, tiles=4, seed=3)
    candidates = torch.tensor(list(itertools.permutations(range(4))))  # lexicographic, as the greedy's ties
    for i in range(1, len(chosen)):
        average = hamming(candidates, chosen[:i]).float().mean(1)
        taken = (hamming(candidates, chosen[:i]) == 0).any(1)
        best = average.masked_fill(taken, -1).max()
        first_best = candidates[int(torch.nonzero(average.masked_fill(taken, -1) == best)[0])]
        assert torch.equal(chosen[i], first_best), i


def test_the_grid_is_centred_with_smaller_tiles_than_cells():
    assert grid_for(16, 0.8) == Grid(origin=0, cell=5, tile=4) and grid_for(16, 0.8).jitter == 1
    assert grid_for(32, 0.8) == Grid(origin=1, cell=10, tile=8) and grid_for(32, 0.8).jitter == 2
    assert grid_for(8, 0.8) == Grid(origin=1, cell=2, tile=2)  # 8 px test views: no jitter, still 9 tiles


@pytest.mark.parametrize("side", [16, 32])
def test_without_gap_or_jitter_the_tiles_reassemble_the_images_grid_area(side):
    images = torch.rand(2, 3, side, side)
    grid = grid_for(side, 1.0)
    tiles = cut_tiles(images, grid, torch.zeros(2, CELLS, 2, dtype=torch.long))
    end = grid.origin + 3 * grid.cell
    assert torch.equal(reassembled(tiles), images[:, :, grid.origin : end, grid.origin : end])

    orders = max_avg_permutations(10)[torch.tensor([3, 7])]
    mixed = shuffled(tiles, orders)
    for n, i in itertools.product(range(2), range(CELLS)):  # position i holds the tile of cell orders[n, i]
        assert torch.equal(mixed[n, i], tiles[n, orders[n, i]])
    assert torch.equal(reassembled(shuffled(mixed, orders.argsort(1))), reassembled(tiles))  # un-permuted


@pytest.mark.parametrize("side", [16, 32])
def test_jitter_keeps_each_tile_inside_its_cell_and_covers_every_offset(side):
    torch.manual_seed(0)
    images = position_images(64, side)
    grid = grid_for(side, 0.8)
    tiles = jittered_tiles(images, 0.8)
    assert tiles.shape == (64, CELLS, 3, grid.tile, grid.tile)
    top, left = tiles[:, :, 0, 0, 0].long().div(side, rounding_mode="floor"), tiles[:, :, 0, 0, 0].long() % side
    cells = torch.arange(CELLS)
    offsets = torch.stack([top - grid.origin - cells // 3 * grid.cell, left - grid.origin - cells % 3 * grid.cell], 2)
    assert offsets.min() == 0 and offsets.max() == grid.jitter  # inside the cell, and every offset drawn
    assert torch.equal(cut_tiles(images, grid, offsets), tiles)  # each tile is the square at its corner


def test_the_relative_location_labels_name_the_neighbour_they_cut():
    torch.manual_seed(0)
    images = position_images(8, 16)
    grid = grid_for(16, 0.8)
    offsets = random_offsets(8, grid, "cpu")
    tiles = cut_tiles(images, grid, offsets)
    labels = torch.arange(8)  # every neighbour once
    centre, neighbour = centre_and_neighbour(tiles, labels)
    directions = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]  # row-major, centre skipped
    for k, (down, across) in enumerate(directions):
        row, col = 1 + down, 1 + across
        top, left = grid.origin + row * grid.cell + offsets[k, NEIGHBOURS[k], 0], grid.origin + col * grid.cell
        left = left + offsets[k, NEIGHBOURS[k], 1]
        assert torch.equal(neighbour[k], images[k, :, top : top + grid.tile, left : left + grid.tile]), k
        c_top, c_left = (grid.origin + grid.cell + offsets[k, 4]).tolist()
        assert torch.equal(centre[k], images[k, :, c_top : c_top + grid.tile, c_left : c_left + grid.tile])


def test_jigsaw_encodes_all_nine_tiles_in_one_pass_and_watches_the_whole_images():
    torch.manual_seed(0)
    method = Jigsaw(TinyEncoder(), Jigsaw.Knobs(**SMALL[Jigsaw], tile_size=8))
    seen = []
    method.encoder.register_forward_hook(lambda module, args, output: seen.append(args[0].shape))
    loss, embeddings = method([torch.rand(4, 3, 16, 16)])
    assert seen == [(36, 3, 8, 8), (4, 3, 16, 16)] and embeddings.shape == (4, 8) and not embeddings.requires_grad
    assert abs(loss.item() - math.log(10)) < 0.5  # ten permutations, none learnt yet


def test_the_tile_side_must_suit_vit_patches_and_the_views_are_grayed():
    with pytest.raises(pydantic.ValidationError):
        Jigsaw.Knobs(tile_size=6)
    knobs = RelativeLocation.Knobs()
    assert RelativeLocation.views(knobs, ViewConfig(), 16)[0].config.grayscale_prob == 0.66
    assert RelativeLocation.views(knobs, ViewConfig(grayscale_prob=0.9), 16)[0].config.grayscale_prob == 0.9


def ramp_images(n: int) -> torch.Tensor:
    """Brighter down the first channel and across the second, plus noise: a tile's colour tells its cell."""
    ramp = torch.linspace(0, 1, 16)
    images = torch.stack([ramp[:, None].expand(16, 16), ramp[None].expand(16, 16), torch.zeros(16, 16)])
    return (images + 0.1 * torch.rand(n, 3, 16, 16)).clamp(0, 1)


@pytest.mark.parametrize("cls", [Jigsaw, RelativeLocation])
def test_both_learn_their_task_on_a_batch_of_the_real_encoder(cls):
    torch.manual_seed(0)
    encoder = Encoder(ModelConfig(width=0.5), mean=[0.5] * 3, std=[0.25] * 3, image_size=16)
    method = cls(encoder, cls.Knobs(**SMALL[cls]))  # the default tile sizes
    images = ramp_images(16)
    optimizer = torch.optim.SGD(method.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(25):
        loss, _ = method([images])
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses


@pytest.mark.parametrize("cls", [Jigsaw, RelativeLocation])
def test_both_run_under_bf16_autocast_with_a_float32_loss(cls):
    torch.manual_seed(0)
    method = cls(TinyEncoder(), cls.Knobs(**SMALL[cls], tile_size=8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, embeddings = method([torch.rand(4, 3, 8, 8)])
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and embeddings.dtype == torch.float32
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in method.parameters() if p.grad is not None)
