"""Colorization: the colour maths (CIE Lab, the in-gamut bins, the soft encoding, the cells' targets) and the
method: its encoder sees only lightness, it learns its task on a batch, and its loss is float32 under bf16."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from selfsup.config import MethodConfig, ModelConfig
from selfsup.data.lab import lab_to_rgb, lightness_image, rgb_to_lab
from selfsup.errors import ConfigError
from selfsup.methods import check_data
from selfsup.methods.colorization import (
    Colorization,
    candidate_table,
    cell_histograms,
    cell_mean_ab,
    gamut_bins,
    pixel_cells,
    soft_encode,
)
from selfsup.models import Encoder
from tests.unit.methods.test_method_losses import TinyEncoder

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only add overhead


def colours(*rgb: tuple[float, float, float]) -> torch.Tensor:
    """The colours as a 3 x 1 x K image."""
    return torch.tensor(rgb).T.reshape(3, 1, -1)


def test_lab_of_known_colours_and_the_round_trip():
    lab = rgb_to_lab(colours((1, 1, 1), (0, 0, 0), (1, 0, 0), (0.5, 0.5, 0.5))).reshape(3, -1).T
    torch.testing.assert_close(lab[0], torch.tensor([100.0, 0, 0]), atol=1e-3, rtol=0)
    torch.testing.assert_close(lab[1], torch.zeros(3), atol=1e-3, rtol=0)
    torch.testing.assert_close(lab[2], torch.tensor([53.24, 80.09, 67.20]), atol=0.01, rtol=0)
    torch.testing.assert_close(lab[3], torch.tensor([53.39, 0, 0]), atol=0.01, rtol=0)  # sRGB's gamma: not 50
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    lab = rgb_to_lab(images)
    assert lab.shape == images.shape and 0 <= lab[:, 0].min() and lab[:, 0].max() <= 100
    assert (lab_to_rgb(lab) - images).abs().max() < 1e-4


def test_the_bins_are_the_grid_10_cells_the_srgb_gamut_reaches():
    bins = gamut_bins()
    assert 250 <= len(bins) <= 313 and bins.shape[1] == 2  # the paper's 313 fill its gamut's convex hull
    assert torch.equal(bins % 10, torch.zeros_like(bins)) and [0.0, 0.0] in bins.tolist()
    # Inside the gamut: each bin's cell holds a Lab colour that converts (backwards) into the RGB cube.
    lightness, offsets = torch.linspace(0, 100, 101), torch.linspace(-5, 5, 5)
    a, b = (bins[:, i, None] + offsets for i in (0, 1))
    grid = torch.broadcast_tensors(lightness.view(1, -1, 1, 1), a.view(-1, 1, 5, 1), b.view(-1, 1, 1, 5))
    rgb = lab_to_rgb(torch.stack(grid, 1).flatten(3))
    assert ((rgb >= 0) & (rgb <= 1)).all(1).flatten(1).any(1).all()
    # And they cover it: random colours and the cube's corners each fall in some bin's cell.
    corners = torch.cartesian_prod(*[torch.tensor([0.0, 1.0])] * 3)
    samples = torch.cat([corners, torch.rand(20_000, 3, generator=torch.Generator().manual_seed(0))])
    cells = torch.round(rgb_to_lab(samples.T.reshape(3, -1, 1))[1:].reshape(2, -1).T / 10) * 10
    assert (cells[:, None] == bins).all(-1).any(1).all()


def test_soft_encodings_are_distributions_on_the_five_nearest_bins_centred_on_the_nearest():
    bins, table = gamut_bins(), candidate_table()
    rgb = torch.rand(3, 1, 5000, generator=torch.Generator().manual_seed(0))
    ab = rgb_to_lab(rgb)[1:].reshape(2, -1).T
    which, weights = soft_encode(ab, bins, table)
    assert which.shape == weights.shape == (5000, 5)
    assert (weights >= 0).all() and torch.allclose(weights.sum(1), torch.ones(5000))
    assert (which.sort(1).values.diff(dim=1) > 0).all()  # five different bins
    distances = torch.cdist(ab, bins, compute_mode="donot_use_mm_for_euclid_dist")
    assert torch.equal(which.gather(1, weights.argmax(1, keepdim=True)).squeeze(1), distances.argmin(1))
    fifth = distances.topk(5, largest=False).values[:, -1]
    assert (distances.gather(1, which).max(1).values <= fifth + 1e-3).float().mean() > 0.99  # the five nearest
    # On a bin's centre inside the gamut, the paper's Gaussian: its four neighbours at distance 10 share e^-2 each.
    which, weights = soft_encode(torch.tensor([[0.0, 0.0]]), bins, table)
    expected = torch.tensor([1.0] + [math.exp(-2)] * 4) / (1 + 4 * math.exp(-2))
    torch.testing.assert_close(weights[0].sort(descending=True).values, expected)
    assert bins[which[0, weights[0].argmax()]].tolist() == [0.0, 0.0]


def test_the_cells_partition_the_image_and_their_targets_are_their_pixels_means():
    cells = pixel_cells(2, 6, 6, 4, torch.device("cpu"))  # 6 px into 4 cells a side: 2, 1, 2, 1 px
    assert cells.shape == (2, 6, 6) and torch.equal(cells.unique(), torch.arange(32))
    assert cells[0, 0].tolist() == [0, 0, 1, 2, 2, 3] and cells[1, 5, 5] == 31

    red, blue = torch.tensor([1.0, 0, 0]), torch.tensor([0, 0, 1.0])
    image = torch.zeros(1, 3, 8, 8)
    image[0, :, :, :4] = red.view(3, 1, 1)  # the left half red, the right half blue
    image[0, :, :, 4:] = blue.view(3, 1, 1)
    image[0, :, 0, 0] = blue  # but one pixel of the top-left cell (4 px of 2 x 2 cells)
    lab, bins, table = rgb_to_lab(image), gamut_bins(), candidate_table()
    histograms = cell_histograms(lab, 2, bins, table)
    assert histograms.shape == (1, 4, len(bins)) and torch.allclose(histograms.sum(-1), torch.ones(1, 4))

    def encoding(rgb):  # one colour's soft encoding, dense
        which, weights = soft_encode(rgb_to_lab(rgb.view(3, 1, 1))[1:].view(1, 2), bins, table)
        return torch.zeros(len(bins)).index_add_(0, which[0], weights[0])

    torch.testing.assert_close(histograms[0, 0], (15 * encoding(red) + encoding(blue)) / 16)
    torch.testing.assert_close(histograms[0, 1], encoding(blue))
    torch.testing.assert_close(histograms[0, 2], encoding(red))
    means = cell_mean_ab(lab, 2)
    torch.testing.assert_close(means[0, 0], lab[0, 1:, :4, :4].mean((1, 2)) / 100)
    torch.testing.assert_close(means[0, 3], lab[0, 1:, 4:, 4:].mean((1, 2)) / 100)


def test_on_gray_images_every_target_is_the_same():
    """The digits' case: gray has ab = 0, so every cell of every image asks for the same colours."""
    gray = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0)).expand(3, 3, 16, 16)
    lab = rgb_to_lab(gray)
    histograms = cell_histograms(lab, 4, gamut_bins(), candidate_table())
    torch.testing.assert_close(histograms, histograms[:1, :1].expand_as(histograms), atol=1e-4, rtol=0)
    assert cell_mean_ab(lab, 4).abs().max() < 1e-6


def same_lightness_other_colour(gray: torch.Tensor, shift: float) -> torch.Tensor:
    """Gray images recoloured without changing their luminance (so L): linear RGB moved along a direction
    the luminance row (0.2127, 0.7152, 0.0722) is blind to."""
    linear = torch.where(gray <= 0.04045, gray / 12.92, ((gray + 0.055) / 1.055) ** 2.4)
    linear = linear + shift * torch.tensor([0.7151522, -0.2126729, 0.0]).view(1, 3, 1, 1)
    return torch.where(linear <= 0.0031308, linear * 12.92, 1.055 * linear ** (1 / 2.4) - 0.055)


def test_the_encoder_never_sees_colour():
    torch.manual_seed(0)
    method = Colorization(TinyEncoder(), Colorization.Knobs(head_hidden_dim=16)).eval()
    gray = (0.4 + 0.3 * torch.rand(2, 1, 16, 16)).expand(2, 3, 16, 16)
    coloured = same_lightness_other_colour(gray, 0.25)
    lab_gray, lab_coloured = rgb_to_lab(gray), rgb_to_lab(coloured)
    assert (lab_gray[:, 0] - lab_coloured[:, 0]).abs().max() < 1e-3  # the same L
    assert (lab_coloured[:, 1:] - lab_gray[:, 1:]).norm(dim=1).amin() > 10  # other colours, everywhere
    assert (lightness_image(coloured) - gray).abs().max() < 1e-5  # its gray image is the gray one
    seen = []
    method.encoder.register_forward_hook(lambda module, args, output: seen.append(output))
    method([gray]), method([coloured])
    torch.testing.assert_close(seen[0], seen[1], atol=1e-5, rtol=0)
    assert (method.encoder(gray) - method.encoder(coloured)).abs().max() > 1e-3  # shown colour, it would differ


@pytest.mark.parametrize("loss", ["classification", "regression"])
def test_colorization_learns_its_task_on_a_batch(loss):
    """A few SGD steps of the real encoder on one batch of blocky colour images halve the loss's excess over
    the least it can be (the targets' entropy for cross-entropy, 0 for L2)."""
    torch.manual_seed(0)
    encoder = Encoder(ModelConfig(), mean=[0.5] * 3, std=[0.25] * 3, image_size=16)
    method = Colorization(encoder, Colorization.Knobs(loss=loss, head_hidden_dim=64))
    images = torch.nn.functional.interpolate(torch.rand(8, 3, 4, 4), scale_factor=4)  # a colour per 4 px cell
    targets = cell_histograms(rgb_to_lab(images), 4, gamut_bins(), candidate_table())
    least = -(targets * targets.clamp(min=1e-12).log()).sum(-1).mean().item() if loss == "classification" else 0.0
    optimizer = torch.optim.SGD(method.parameters(), lr=0.5, momentum=0.9)
    losses = []
    for _ in range(20):
        loss_value, embeddings = method([images])
        losses.append(loss_value.item())
        optimizer.zero_grad()
        loss_value.backward()
        optimizer.step()
    assert embeddings.shape == (8, encoder.feature_dim) and not embeddings.requires_grad
    assert least < losses[-1] < least + 0.5 * (losses[0] - least), (least, losses)


@pytest.mark.parametrize("loss", ["classification", "regression"])
def test_bf16_autocast_gives_a_float32_loss_also_on_views_smaller_than_the_images(loss):
    torch.manual_seed(0)
    method = Colorization(TinyEncoder(), Colorization.Knobs(loss=loss, head_hidden_dim=16))
    assert method.grid == 4  # 4 px cells of TinyEncoder's 16 px images; an 8 px view gets 2 px cells
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value, embeddings = method([torch.rand(4, 3, 8, 8)])
    assert value.dtype == torch.float32 and value.ndim == 0 and torch.isfinite(value)
    assert embeddings.dtype == torch.float32 and embeddings.shape == (4, 8)
    value.backward()


def test_only_a_method_that_needs_colour_refuses_gray_images_and_one_coloured_pixel_is_colour():
    gray = np.repeat(np.random.default_rng(0).integers(0, 256, (4, 8, 8, 1), dtype=np.uint8), 3, axis=-1)
    with pytest.raises(ConfigError, match=r"method.name=colorization .* every training image of digits is gray"):
        check_data(MethodConfig(name="colorization"), gray, "digits")
    for method in ("rotation", "simclr", "inpainting"):
        check_data(MethodConfig(name=method), gray, "digits")
    coloured = gray.copy()
    coloured[3, 5, 2, 1] ^= 1  # G differs from R and B in one pixel of one image
    check_data(MethodConfig(name="colorization"), coloured, "digits")
