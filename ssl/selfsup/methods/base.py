"""The contract every method fulfils, in one place.

A method is one file: a subclass of `Method` with its heads, its loss and the declarations below. The one
training loop, the params, the sweeps and the errors read these declarations and nothing else; a subclass
that leaves a required one out fails when its class is defined, naming what is missing.

    class SimCLR(Method):
        name = "simclr"                 # what users pick it by: method.name
        min_batch = 2                   # the smallest per-worker batch its loss is defined on
        lr = 0.3                        # its learning rate per 256 images (SGD, LARS); train.lr "auto" scales it
        advice = "raise method.simclr.temperature"   # what to change on a NaN loss or a collapse

        class Knobs(MethodKnobs): ...   # its own params, method.simclr.* in params.yaml, with their defaults

        views = staticmethod(two_views) # (knobs, views, image_size) -> list[ViewSpec]: what forward gets, in order

        def __init__(self, encoder, knobs): ...
        def forward(self, views): ...   # -> (loss, embeddings): the embeddings are watched for collapse

What a method reads besides its views is declared too: `uses_labels` (forward gets `labels=`, and the
method is built with `num_classes=`), `uses_indices` (forward gets `indices=`, the images' positions in the
training set, and it is built with `num_images=`). `needs_colour` makes the pretrain stage refuse gray images.
The hooks are no-ops here; a method overrides the ones it needs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from selfsup.config import MethodKnobs, ViewConfig
from selfsup.data.views import ViewSpec

# Declarations every method makes itself: a default here would hide a method that forgot one.
REQUIRED = ("name", "Knobs", "min_batch", "lr", "advice", "views")


@dataclass(frozen=True)
class TrainingProgress:
    """Where training stands at an optimiser step; the loop hands it to the methods' hooks."""

    step: int  # this step's index, from 0
    total_steps: int
    steps_per_epoch: int

    @property
    def fraction(self) -> float:
        """Steps done after this one, over all steps: momentum schedules run from 0 to 1 on it."""
        return (self.step + 1) / self.total_steps

    @property
    def epoch(self) -> float:
        """Epochs done before this step, fractional."""
        return self.step / self.steps_per_epoch


class Method(nn.Module):
    """Base of every method: the declarations it must make, what it may declare, and its hooks."""

    name: ClassVar[str]
    Knobs: ClassVar[type[MethodKnobs]]
    min_batch: ClassVar[int]
    lr: ClassVar[float]
    advice: ClassVar[str]
    views: ClassVar[Callable[[MethodKnobs, ViewConfig, int], list[ViewSpec]]]

    uses_labels: ClassVar[bool] = False
    uses_indices: ClassVar[bool] = False
    needs_colour: ClassVar[bool] = False

    encoder: nn.Module  # the backbone it trains: what is saved, registered and evaluated

    def __init_subclass__(cls, abstract: bool = False, **kwargs) -> None:
        """Checks the declarations when the class is defined; `abstract=True` marks a base for other methods."""
        super().__init_subclass__(**kwargs)
        if abstract:
            return
        missing = [attribute for attribute in REQUIRED if not hasattr(cls, attribute)]
        if missing:
            raise TypeError(
                f"method class {cls.__name__} does not declare {', '.join(missing)}; every method declares "
                f"{', '.join(REQUIRED)} (see selfsup.methods.base)"
            )
        problems = []
        if not (isinstance(cls.name, str) and cls.name.isidentifier() and cls.name.islower()):
            problems.append(f"name={cls.name!r} must be a lowercase identifier (it is a params.yaml key)")
        if not (isinstance(cls.Knobs, type) and issubclass(cls.Knobs, MethodKnobs)):
            problems.append("Knobs must subclass selfsup.config.MethodKnobs")
        if not (isinstance(cls.min_batch, int) and cls.min_batch >= 1):
            problems.append(f"min_batch={cls.min_batch!r} must be an int >= 1")
        if not (isinstance(cls.lr, int | float) and cls.lr > 0):
            problems.append(f"lr={cls.lr!r} must be a number > 0")
        if not (isinstance(cls.advice, str) and cls.advice):
            problems.append("advice must say, in words, what to change on a NaN loss or a collapse")
        if not callable(cls.views):
            problems.append("views must be a staticmethod (knobs, views, image_size) -> list[ViewSpec]")
        if problems:
            raise TypeError(f"method class {cls.__name__}: {'; '.join(problems)}")

    def forward(self, views: list[torch.Tensor], **inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the views its `views` declares, made on the device; `labels=` / `indices=` as declared) ->
        (the loss, the detached embeddings the loss compares)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement forward")

    def after_backward(self, progress: TrainingProgress) -> None:
        """Between backward and the optimiser step: drop gradients to freeze a part (prototypes, a last layer)."""

    def after_step(self, progress: TrainingProgress) -> None:
        """After the optimiser step: EMA teacher, queue, centre, normalisation."""

    def fixed_lr_parameters(self) -> Iterable[nn.Parameter]:
        """Parameters the learning-rate schedule leaves at the peak learning rate (SimSiam's predictor)."""
        return ()
