"""The method contract: a method that leaves out a declaration fails when its class is defined, naming what is
missing; the hooks are no-ops unless a method overrides them; the registry refuses two methods of one name."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from selfsup.config import MethodKnobs
from selfsup.methods import METHODS, _registry
from selfsup.methods.base import REQUIRED, Method, TrainingProgress
from selfsup.methods.common import two_views


def declarations(**overrides) -> dict:
    class Knobs(MethodKnobs):
        pass

    values = {
        "name": "tiny",
        "Knobs": Knobs,
        "min_batch": 2,
        "lr": 0.1,
        "advice": "lower train.lr",
        "views": staticmethod(two_views),
    }
    values.update(overrides)
    return {key: value for key, value in values.items() if value is not None}


def test_a_method_with_every_declaration_is_a_method():
    cls = type("Tiny", (Method,), declarations())
    assert cls.name == "tiny" and not cls.uses_labels and not cls.uses_indices and not cls.needs_colour


@pytest.mark.parametrize("missing", REQUIRED)
def test_a_missing_declaration_fails_at_definition_naming_it(missing):
    with pytest.raises(TypeError, match=rf"method class Tiny does not declare {missing};"):
        type("Tiny", (Method,), declarations(**{missing: None}))


@pytest.mark.parametrize(
    "bad, named",
    [
        ({"lr": 0}, "lr=0"),
        ({"min_batch": 0}, "min_batch=0"),
        ({"name": "two words"}, "name='two words'"),
        ({"name": "SimCLR"}, "name='SimCLR' must be a lowercase identifier"),
        ({"advice": ""}, "advice must say"),
    ],
)
def test_a_bad_declaration_fails_at_definition_naming_it(bad, named):
    with pytest.raises(TypeError, match=named):
        type("Tiny", (Method,), declarations(**bad))


def test_knobs_must_be_method_knobs():
    with pytest.raises(TypeError, match="Knobs must subclass selfsup.config.MethodKnobs"):
        type("Tiny", (Method,), declarations(Knobs=dict))


def test_the_hooks_are_no_ops_and_a_method_overrides_only_what_it_needs():
    cls = type("Tiny", (Method,), declarations())
    method = cls()
    method.layer = nn.Linear(2, 2)
    before = [p.clone() for p in method.parameters()]
    progress = TrainingProgress(0, 1, 1)
    assert method.after_backward(progress) is None and method.after_step(progress) is None
    assert list(method.fixed_lr_parameters()) == []
    assert all(torch.equal(a, b) for a, b in zip(before, method.parameters()))
    with pytest.raises(NotImplementedError, match="Tiny does not implement forward"):
        method([])


def test_every_registered_method_declares_the_contract_itself():
    for name, cls in METHODS.items():
        assert issubclass(cls, Method) and cls.name == name
        for attribute in ("name", "Knobs", "min_batch", "lr", "advice"):
            assert attribute in vars(cls), f"{cls.__name__} inherits {attribute} instead of declaring it"


def test_the_registry_refuses_two_methods_of_one_name():
    first = type("First", (Method,), declarations())
    second = type("Second", (Method,), declarations())
    with pytest.raises(TypeError, match="methods First and Second share the name 'tiny'"):
        _registry((first, second))
