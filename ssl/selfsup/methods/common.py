"""What methods share: the views they declare, queues, and forwarding views grouped by size."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.config import ViewConfig
from selfsup.data.views import ViewSpec


def one_view(knobs, views: ViewConfig, image_size: int) -> list[ViewSpec]:
    """One augmented view, which the method transforms itself (the pretext tasks) or labels (supervised)."""
    return [ViewSpec(views)]


def labelled_cross_entropy(
    head: nn.Module, features: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Cross-entropy of the head's scores against the labels, in float32 even under bf16 autocast: the pretext
    tasks' classifiers (their labels from the transform) and the supervised reference's."""
    logits = head(features).float()
    with torch.autocast(logits.device.type, enabled=False):
        return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)


def two_views(knobs, views: ViewConfig, image_size: int) -> list[ViewSpec]:
    """Two views made alike (SimCLR, MoCo, SimSiam, SwAV without multi-crop)."""
    return [ViewSpec(views), ViewSpec(views)]


def asymmetric_views(views: ViewConfig) -> list[ViewSpec]:
    """BYOL's pair (also Barlow Twins' and DINO's global crops): the first view is always blurred and
    never solarised, the second rarely blurred and solarised. Blur or solarize off in `views` stays off."""
    first = views.model_copy(update={"blur_prob": 1.0 if views.blur_prob else 0.0, "solarize_prob": 0.0})
    second = views.model_copy(update={"blur_prob": 0.1 if views.blur_prob else 0.0})
    return [ViewSpec(first), ViewSpec(second)]


def with_local_views(
    global_views: list[ViewSpec],
    views: ViewConfig,
    image_size: int,
    count: int,
    size_fraction: float,
    crop_scale: tuple[float, float],
) -> list[ViewSpec]:
    """Multi-crop (SwAV, DINO): the global views, then `count` small crops of a smaller area range,
    each `size_fraction` of the image side (18 px at 32 px for 0.5625)."""
    local = ViewSpec(
        views.model_copy(update={"crop_scale": crop_scale}), size=max(1, round(size_fraction * image_size))
    )
    return global_views + [local] * count


@torch.no_grad()
def enqueue(queue: torch.Tensor, end: torch.Tensor, items: torch.Tensor) -> None:
    """First in, first out: `items` overwrite `queue`'s oldest rows, from `end` (a 0-d index buffer, moved past
    them) wrapping around; of more items than it holds only the newest stay (MoCo's keys, OBoW's words)."""
    items = items[-len(queue) :]
    slots = (end + torch.arange(len(items), device=items.device)) % len(queue)
    queue[slots] = items.to(queue.dtype)
    end.copy_((end + len(items)) % len(queue))


def forward_by_size(module: Callable[[torch.Tensor], torch.Tensor], views: list[torch.Tensor]) -> list[torch.Tensor]:
    """Run module on the views, one pass per run of equal-sized views (as DINO's MultiCropWrapper), so
    views of a size share BatchNorm statistics; returns one output per view."""
    outputs, start = [], 0
    while start < len(views):
        end = start
        while end < len(views) and views[end].shape == views[start].shape:
            end += 1
        outputs += module(torch.cat(views[start:end])).chunk(end - start)
        start = end
    return outputs


def cross_view_cross_entropy(
    targets: list[torch.Tensor], scores: list[torch.Tensor], temperature: float
) -> torch.Tensor:
    """Mean over pairs (target view a, other view v != a) of -sum_k target_a,k log softmax(scores_v / T)_k:
    SwAV's swapped prediction (targets: codes) and DINO's loss (targets: the teacher's softmax)."""
    terms = [
        -(target * F.log_softmax(view_scores / temperature, dim=1)).sum(1).mean()
        for a, target in enumerate(targets)
        for v, view_scores in enumerate(scores)
        if v != a
    ]
    return sum(terms) / len(terms)


def encode_then_head(
    encoder: Callable[[torch.Tensor], torch.Tensor], head: nn.Module, views: list[torch.Tensor]
) -> list[torch.Tensor]:
    """The encoder once per run of equal-sized views, then the head once over every view's features, as
    SwAV's model and DINO's MultiCropWrapper do: the head's BatchNorm sees all the crops in one batch.
    Returns one output per view."""
    return list(head(torch.cat(forward_by_size(encoder, views))).chunk(len(views)))
