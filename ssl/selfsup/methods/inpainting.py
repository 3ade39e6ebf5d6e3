"""Context encoder (Pathak et al., 2016): reconstruct a masked region from the rest of the image.

A pretext task: the target is the image itself. As the paper's feature model, reconstruction (L2) only, no
adversarial term. The masked square covers `mask_fraction` of the side (0.5: 8 of 16 px, 16 of 32 px, as the
paper's 64 of 128) and is filled with the dataset's mean colour (the Encoder's, so it normalises to zero).
`region: random` places it anywhere in the image, per image (the paper's random-region variant, `train_random.lua`);
`region: centre` is the paper's central square. A decoder maps the pooled features to the whole image's pixels
(the paper's channel-wise fully connected layer and up-convolutions, collapsed into an MLP at this size); only the
masked pixels enter the loss.

Random is the default: on 16 px digits the centre hides most of the digit in every view, so the encoder never
sees the pixels it is evaluated on; random scored higher there (docs/methods.md).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from selfsup.config import MethodKnobs
from selfsup.distributed import randint_per_image
from selfsup.methods.base import Method
from selfsup.methods.common import one_view
from selfsup.models.heads import mlp


def box_side(side: int, fraction: float) -> int:
    """The masked square's side: `fraction` of the image's, at least 1 px."""
    return max(1, min(side, round(side * fraction)))


def region_masks(images: torch.Tensor, fraction: float, region: str) -> torch.Tensor:
    """N x 1 x H x W booleans, True on each image's masked square: the centre, or at a random place per image."""
    n, _, h, w = images.shape
    size_h, size_w = box_side(h, fraction), box_side(w, fraction)
    if region == "centre":
        top = torch.full((n,), (h - size_h) // 2, device=images.device)
        left = torch.full((n,), (w - size_w) // 2, device=images.device)
    else:
        top = randint_per_image(h - size_h + 1, n, images.device)
        left = randint_per_image(w - size_w + 1, n, images.device)
    rows = torch.arange(h, device=images.device)[None, :] - top[:, None]
    columns = torch.arange(w, device=images.device)[None, :] - left[:, None]
    inside_rows, inside_columns = (rows >= 0) & (rows < size_h), (columns >= 0) & (columns < size_w)
    return (inside_rows[:, :, None] & inside_columns[:, None, :])[:, None]


def inpainting_loss(prediction: torch.Tensor, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the masked pixels only (N x C x H x W prediction and images, N x 1 x H x W masks):
    the pixels around them, which the encoder saw, do not enter the loss."""
    squared = F.mse_loss(prediction, images, reduction="none") * masks
    return squared.sum() / (masks.sum() * images.shape[1]).clamp(min=1)


class Inpainting(Method):
    name = "inpainting"
    min_batch = 2  # BatchNorm in the decoder needs two images
    lr = 0.3  # per 256 images (SGD; the paper used Adam at 2e-4): better than 0.1 on the digits (docs/methods.md)

    advice = "lower train.lr"

    class Knobs(MethodKnobs):
        mask_fraction: float = Field(default=0.5, gt=0, lt=1)  # the masked square's side, of the image's
        region: Literal["random", "centre"] = "random"
        decoder_hidden_dim: int = Field(default=1024, ge=1)

    views = staticmethod(one_view)

    def __init__(self, encoder: nn.Module, knobs: Knobs):
        super().__init__()
        self.encoder, self.knobs = encoder, knobs
        self.decoder = mlp(encoder.feature_dim, knobs.decoder_hidden_dim, 3 * encoder.image_size**2)

    def forward(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        images = views[0]
        masks = region_masks(images, self.knobs.mask_fraction, self.knobs.region)
        features = self.encoder(torch.where(masks, self.encoder.mean[0], images))
        prediction = self.decoder(features).float().view(images.shape)
        with torch.autocast(prediction.device.type, enabled=False):
            loss = inpainting_loss(torch.sigmoid(prediction), images.float(), masks)
        return loss, features.detach().float()
