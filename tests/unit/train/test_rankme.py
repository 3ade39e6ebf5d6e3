"""RankMe (Garrido et al., 2023): the label-free measure the champion can be chosen on."""

from __future__ import annotations

import pytest
import torch

from selfsup.train.collapse import rankme


def test_rankme_counts_the_dimensions_the_representations_use() -> None:
    generator = torch.Generator().manual_seed(0)
    isotropic = torch.randn(4000, 16, generator=generator)
    assert 15.0 < rankme(isotropic) <= 16.0 + 1e-6
    line = torch.randn(500, 1, generator=generator) * torch.randn(1, 16, generator=generator)  # rank 1
    assert rankme(line) == pytest.approx(1.0, abs=1e-3)
    two = torch.zeros(500, 16)
    two[::2, 0], two[1::2, 5] = 1.0, 1.0  # two orthogonal directions, equal energy
    assert rankme(two) == pytest.approx(2.0, abs=1e-3)


def test_rankme_ignores_scale_but_sees_uneven_dimensions() -> None:
    features = torch.randn(2000, 8, generator=torch.Generator().manual_seed(1))
    assert rankme(features * 37.0) == pytest.approx(rankme(features), rel=1e-9)
    uneven = features * torch.tensor([1.0, 1.0, 1.0, 1.0, 0.1, 0.1, 0.1, 0.1])
    assert 4.0 < rankme(uneven) < rankme(features) - 2.0  # the small dimensions count for little
