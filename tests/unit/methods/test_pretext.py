"""The pretext tasks' labels are right: they come from the transform, so a wrong one teaches nothing."""

from __future__ import annotations

import pytest
import torch

from selfsup.methods import build_method
from selfsup.methods.inpainting import inpainting_loss, region_masks
from selfsup.methods.rotation import rotated
from selfsup.params import load_params
from tests.unit.methods.test_method_losses import TinyEncoder


def corner_image(n: int = 1, side: int = 5) -> torch.Tensor:
    """N x 3 x side x side, black but for the top-right pixel."""
    images = torch.zeros(n, 3, side, side)
    images[:, :, 0, side - 1] = 1.0
    return images


def bright_corner(image: torch.Tensor) -> tuple[int, int]:
    row, col = divmod(int(image[0].argmax()), image.shape[-1])
    return row, col


def test_all_four_rotations_are_exact_and_labelled_by_quarter_turns():
    images = corner_image(n=2)
    out, turns = rotated(images, all_rotations=True)
    assert out.shape == (8, 3, 5, 5) and turns.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    # The top-right pixel, turned counter-clockwise: to the top-left, bottom-left, bottom-right.
    expected = {0: (0, 4), 1: (0, 0), 2: (4, 0), 3: (4, 4)}
    for image, k in zip(out, turns.tolist()):
        assert bright_corner(image) == expected[k], k
    for k in range(4):  # each is exactly the original turned k times, and turning back restores it
        chunk = out[2 * k : 2 * k + 2]
        assert torch.equal(chunk, torch.rot90(images, k, dims=(2, 3)))
        assert torch.equal(torch.rot90(chunk, -k, dims=(2, 3)), images)


def test_one_rotation_per_image_is_balanced_and_undoes_to_the_original():
    images = torch.rand(6, 3, 4, 4)
    out, turns = rotated(images, all_rotations=False)
    assert out.shape == images.shape and turns.tolist() == [0, 1, 2, 3, 0, 1]
    for i, k in enumerate(turns.tolist()):
        assert torch.equal(torch.rot90(out[i], -k, dims=(1, 2)), images[i])


def test_rotation_learns_its_task_on_a_batch():
    """A few steps on one batch drive the loss well below log(4): the labels are learnable, so they are consistent."""
    torch.manual_seed(0)
    params = load_params({"method": {"name": "rotation", "rotation": {"head_hidden_dim": 16}}})
    method = build_method(TinyEncoder(), params.method)
    images = torch.rand(8, 3, 8, 8)
    images[:, :, :3] += 1.0  # an "up": the top rows brighter, so rotations differ
    optimizer = torch.optim.SGD(method.parameters(), lr=0.5, momentum=0.9)
    first = None
    for _ in range(30):
        loss, _ = method([images])
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert abs(first - torch.log(torch.tensor(4.0)).item()) < 0.3 and loss.item() < 0.5 * first


def test_inpainting_masks_one_square_per_image_and_its_loss_sees_only_that_region():
    images = torch.rand(64, 3, 16, 16)
    centre = region_masks(images, 0.5, "centre")
    assert centre.shape == (64, 1, 16, 16) and centre[:, :, 4:12, 4:12].all() and centre.sum() == 64 * 64
    torch.manual_seed(0)
    random = region_masks(images, 0.5, "random")
    rows, columns = random.any(3)[:, 0], random.any(2)[:, 0]
    assert (random.flatten(1).sum(1) == 64).all()  # one 8 x 8 square in each image...
    assert (rows.sum(1) == 8).all() and (columns.sum(1) == 8).all()
    assert len({(int(r.nonzero()[0]), int(c.nonzero()[0])) for r, c in zip(rows, columns)}) > 20  # ...anywhere
    assert not torch.equal(random, centre)
    assert region_masks(torch.rand(1, 3, 8, 8), 0.01, "centre").sum() == 1  # at least one pixel

    prediction = torch.rand(64, 3, 16, 16)
    loss = inpainting_loss(prediction, images, random)
    expected = ((prediction - images) ** 2)[random.expand_as(images)].mean()
    torch.testing.assert_close(loss, expected)
    changed_context = torch.where(random, images, torch.rand_like(images))
    assert torch.equal(inpainting_loss(prediction, changed_context, random), loss)  # the context does not count
    changed_region = torch.where(random, images + 0.5, images)
    assert not torch.equal(inpainting_loss(prediction, changed_region, random), loss)


@pytest.mark.parametrize("region", ["centre", "random"])
def test_the_inpainting_encoder_never_sees_the_pixels_it_must_predict(region):
    params = load_params({"method": {"name": "inpainting", "inpainting": {"decoder_hidden_dim": 16, "region": region}}})
    method = build_method(TinyEncoder(), params.method).eval()
    images = torch.rand(2, 3, 16, 16)
    torch.manual_seed(0)
    masks = region_masks(images, 0.5, region)
    other_region = torch.where(masks, torch.rand_like(images), images)
    seen = []
    method.encoder.register_forward_hook(lambda module, args, output: seen.append(output))
    for batch in (images, other_region):
        torch.manual_seed(0)  # the same squares both times
        method([batch])
    assert torch.equal(seen[0], seen[1])  # the same features: the square was hidden


def test_counting_tiles_are_the_quadrants_of_the_image_and_its_loss_is_the_formula_per_count():
    from selfsup.methods.counting import counting_loss, downsampled, quadrants

    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    whole, tiles = downsampled(images), quadrants(images)
    assert whole.shape == (2, 3, 2, 2) and all(t.shape == (2, 3, 2, 2) for t in tiles)
    assert torch.equal(torch.cat([torch.cat(tiles[:2], 3), torch.cat(tiles[2:], 3)], 2), images)  # they reassemble it
    assert torch.allclose(whole[:, :, 0, 0], images[:, :, :2, :2].mean((2, 3)))

    torch.manual_seed(0)
    counts_whole, tiles_sum, other = torch.rand(3, 5), torch.rand(3, 5), torch.rand(3, 5)
    margin = 0.1  # some dimensions' differences exceed it, some do not: the hinge is active on part of them
    expected = 0.0
    for i in range(3):  # the formula, one image and one count dimension at a time
        for k in range(5):
            same = (counts_whole[i, k] - tiles_sum[i, k]) ** 2
            different = (other[i, k] - tiles_sum[i, k]) ** 2
            expected += same + max(0.0, margin - different)
    torch.testing.assert_close(counting_loss(counts_whole, tiles_sum, other, margin), expected / 15)


def test_counting_info_nce_is_the_cross_entropy_of_each_tile_sum_picking_its_own_image_by_cosine():
    from selfsup.methods.counting import count_info_nce

    torch.manual_seed(0)
    whole, tiles_sum, temperature = torch.rand(3, 5), torch.rand(3, 5), 0.2
    expected = 0.0
    for i in range(3):  # -log softmax over the images' counts, one tile sum at a time
        cosines = [torch.nn.functional.cosine_similarity(tiles_sum[i], whole[j], dim=0) for j in range(3)]
        logits = torch.stack(cosines) / temperature
        expected += -(logits[i] - logits.logsumexp(0))
    torch.testing.assert_close(count_info_nce(whole, tiles_sum, temperature), expected / 3)
    # The loss falls as each tile sum points at its own image: matched counts beat shuffled ones.
    assert count_info_nce(whole, whole * 2, temperature) < count_info_nce(whole, (whole * 2).roll(1, 0), temperature)


def test_counting_takes_the_downsampled_image_from_the_first_view_and_the_tiles_from_the_second():
    from selfsup.methods.counting import downsampled, quadrants

    first, second = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    whole, tiles = downsampled(first), quadrants(second)
    for contrast in ("info_nce", "hinge"):
        params = load_params({"method": {"name": "counting", "counting": {"contrast": contrast}}})
        method = build_method(TinyEncoder(), params.method)
        seen = []
        method.encoder.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
        loss, _ = method([first, second])
        assert torch.equal(seen[0], torch.cat([whole, *tiles]))  # one encoder pass over all five
        assert torch.isfinite(loss) and loss > 0
