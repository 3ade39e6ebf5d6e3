"""Collapse statistics of a batch of embeddings, watched every epoch while a method trains."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


@torch.no_grad()
def embedding_std(z: torch.Tensor) -> torch.Tensor:
    """Mean per-dimension std of the L2-normalised embeddings, times sqrt(dim): about 1 when they spread
    over the sphere, 0 when every image maps to one point (the SimSiam paper's collapse measure).
    A 0-d tensor on z's device: the loop sums it every step and reads it once per epoch."""
    normalized = F.normalize(z.float(), dim=1)
    return normalized.std(0).mean() * math.sqrt(z.shape[1])


@torch.no_grad()
def effective_rank(z: torch.Tensor) -> float:
    """exp of the entropy of the normalised singular values (Roy & Vetterli, 2007; RankMe): how many
    dimensions the embeddings really use, from 1 (collapsed to a line or point) to min(N, dim)."""
    singular = torch.linalg.svdvals(F.normalize(z.float(), dim=1))
    p = singular / singular.sum().clamp(min=1e-12)
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


# RankMe's sample: about 25,600 images (Garrido et al., 2023), enough for the rank of a 2048-d representation.
RANKME_IMAGES = 25_600


def rankme_sample(images: np.ndarray, seed: int) -> np.ndarray:
    """RANKME_IMAGES of the images (all when fewer), drawn at random with `seed` and kept in their order: a split
    is in file (often class) order, and the first ones would be few classes."""
    chosen = np.random.default_rng(seed).permutation(len(images))[:RANKME_IMAGES]
    return images[np.sort(chosen)]


@torch.no_grad()
def rankme(features: torch.Tensor, epsilon: float = 1e-7) -> float:
    """RankMe (Garrido et al., ICML 2023): exp of the entropy of the singular values of the N x D representations,
    normalised to sum to 1 (plus epsilon, as the paper's). Label-free, it tracks downstream accuracy across
    hyperparameters and methods; unlike `effective_rank` the rows are not normalised, as in the paper."""
    singular = torch.linalg.svdvals(features.double())
    p = singular / singular.sum().clamp(min=1e-12) + epsilon
    return float(torch.exp(-(p * p.log()).sum()))
