"""params.yaml, validated: the one place where bad params are caught.

Every pipeline stage turns `params.yaml` into a `Params` object before it spends any compute. `Params`
assembles the sections of `selfsup.config` with what the registries know: one `method.<name>` section per
registered method (its own `Knobs`), the method names, and the backbones of `selfsup.models`. It sits above
both registries, so nothing below imports it. A problem becomes a `ConfigError` whose lines each name the
key, the value and what is allowed.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import yaml
from pydantic import Field, SerializeAsAny, ValidationError, create_model, field_validator, model_validator

from selfsup.config import (
    DataConfig,
    EvalConfig,
    EvalDataConfig,
    MethodConfig,
    MlflowConfig,
    ModelConfig,
    ScalingConfig,
    TrainConfig,
    TuneConfig,
    ViewConfig,
    _Section,
    one_of,
)
from selfsup.errors import ConfigError
from selfsup.methods import METHODS
from selfsup.models import BACKBONE_BUILDERS, WIDTH_MULTIPLIED

ADAMW_LR = 5e-4  # per 256 images: DINO's and most ViT recipes'


class CheckedModelConfig(ModelConfig):
    """model.*, its backbone one the builders know."""

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, value: str) -> str:
        return one_of(value, BACKBONE_BUILDERS, "backbone")

    @model_validator(mode="after")
    def _width_applies(self) -> CheckedModelConfig:
        if self.width != 1.0 and self.backbone not in WIDTH_MULTIPLIED:
            raise ValueError(
                f"model.width={self.width} applies only to {', '.join(WIDTH_MULTIPLIED)}; "
                f"set it to 1.0 for model.backbone={self.backbone!r}"
            )
        return self


class _NamedMethodConfig(MethodConfig):
    @field_validator("name")
    @classmethod
    def _known_method(cls, value: str) -> str:
        return one_of(value, METHODS, "method")


@functools.cache
def method_model() -> type[MethodConfig]:
    """MethodConfig with one section per registered method, each validated by the method's Knobs."""
    sections = {name: (method.Knobs, method.Knobs()) for name, method in METHODS.items()}
    return create_model("MethodConfig", __base__=_NamedMethodConfig, **sections)


class Params(_Section):
    data: DataConfig = DataConfig()
    model: CheckedModelConfig = CheckedModelConfig()
    method: SerializeAsAny[MethodConfig] = Field(default_factory=lambda: method_model()())

    @field_validator("method", mode="before")
    @classmethod
    def _method_sections(cls, value: Any) -> Any:
        if isinstance(value, method_model()):
            return value
        raw = value.model_dump() if isinstance(value, MethodConfig) else value
        return method_model().model_validate(raw)

    views: ViewConfig = ViewConfig()
    train: TrainConfig = TrainConfig()
    scaling: ScalingConfig = ScalingConfig()
    eval: EvalConfig = EvalConfig()
    mlflow: MlflowConfig = MlflowConfig()
    tune: TuneConfig = TuneConfig()

    @model_validator(mode="after")
    def _warmup_ends_before_training(self) -> Params:
        if self.train.warmup_epochs >= self.train.epochs:
            raise ValueError(
                f"train.warmup_epochs={self.train.warmup_epochs} must be below train.epochs={self.train.epochs}: "
                "the learning rate would never reach train.lr nor decay"
            )
        return self

    @model_validator(mode="after")
    def _views_fit_in_the_stored_images(self) -> Params:
        """Also checked against the prepared images (native sizes) before pretraining; here before prepare."""
        stored, size = self.data.image_size, self.views.size
        if stored and size and size > stored:
            raise ValueError(
                f"views.size={size} is larger than data.image_size={stored}, the resolution the images are stored "
                f"at: their crops would be enlarged, with no detail to show; set views.size to at most {stored}, or "
                "raise data.image_size"
            )
        return self

    @model_validator(mode="after")
    def _label_loss_beside_a_self_supervised_method(self) -> Params:
        if self.train.label_loss_weight > 0 and self.method.name == "supervised":
            raise ValueError(
                f"train.label_loss_weight={self.train.label_loss_weight} adds a labelled loss to a self-supervised "
                "method; method.name=supervised already trains on the labels: set it to 0"
            )
        return self

    @model_validator(mode="after")
    def _champion_metric_is_measured(self) -> Params:
        allowed = [f"knn_k{k}_top1" for k in self.eval.knn.k] + ["linear_top1", "rankme"]
        if self.mlflow.champion_metric not in allowed:
            raise ValueError(
                f"mlflow.champion_metric={self.mlflow.champion_metric!r} is not measured; allowed: "
                f"{', '.join(allowed)} (the k of kNN come from eval.knn.k)"
            )
        if self.labels_missing and self.mlflow.champion_metric != "rankme":
            raise ValueError(
                f"mlflow.champion_metric={self.mlflow.champion_metric} needs labelled evaluation data: "
                f"{self.labels_missing}; set eval.data to a labelled dataset, or mlflow.champion_metric: "
                "rankme (label-free)"
            )
        return self

    @property
    def evaluation_data(self) -> EvalDataConfig | None:
        """The labelled dataset the evaluations read when it is not the pretraining data itself: eval.data, or the
        labelled splits of a dataset whose unlabelled ones pretraining reads (STL-10's)."""
        return self.eval.data or self.data.labelled_splits()

    @property
    def labels_missing(self) -> str | None:
        """Why no evaluation that needs labels can run; None when they can."""
        if self.data.labelled or self.evaluation_data is not None:
            return None
        return f"data.source={self.data.source} has no labels and eval.data is not set"

    @model_validator(mode="after")
    def _batch_fits_method(self) -> Params:
        workers, batch = self.scaling.num_workers, self.train.batch_size
        if batch % workers:
            raise ValueError(f"train.batch_size={batch} must divide evenly across scaling.num_workers={workers}")
        needed = METHODS[self.method.name].min_batch
        if batch // workers < needed:
            raise ValueError(
                f"train.batch_size={batch} is too small for method {self.method.name!r}: each of "
                f"{workers} worker(s) needs at least {needed} images; raise train.batch_size to "
                f"at least {needed * workers}"
            )
        return self


def learning_rate(train: TrainConfig, method: MethodConfig) -> float:
    """The peak learning rate: train.lr, or for "auto" the method's own, scaled to the batch size."""
    if train.lr != "auto":
        return train.lr
    per_256_images = ADAMW_LR if train.optimizer == "adamw" else METHODS[method.name].lr
    return per_256_images * train.batch_size / 256


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML reads YAML 1.1, where `1e-05` (no dot) is a string; `dvc exp run -S train.lr=1e-5` writes exactly that
    into params.yaml (DVC's ruamel speaks YAML 1.2). Floats are resolved as YAML 1.2 does."""


_Yaml12Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)


def read_yaml(text: str) -> Any:
    """A params-style YAML document, its numbers read as YAML 1.2 (and DVC) read them."""
    return yaml.load(text, Loader=_Yaml12Loader)


def load_params(raw: dict[str, Any] | None) -> Params:
    """Validate a params mapping (as read from params.yaml); raise ConfigError naming each problem."""
    try:
        return Params.model_validate(raw or {})
    except ValidationError as error:
        raise ConfigError("\n".join(_describe(e) for e in error.errors())) from None


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        if len(error["loc"]) == 3 and error["loc"][0] == "method":  # method.<name>.<knob>
            knob = error["loc"][2]
            owners = [name for name, method in METHODS.items() if knob in method.Knobs.model_fields]
            if owners:
                where = " and ".join(f"method.{name}" for name in owners)
                return f"params.yaml: {key} is not a knob of {error['loc'][1]}; {knob} belongs in {where}"
        return f"params.yaml: {key} is not a known key (a typo?); remove or rename it"
    if error["loc"][:2] == ("tune", "space") and len(error["loc"]) > 2:  # a distribution is a dict, and named by key
        return f"params.yaml: {key}={error.get('input')!r} is invalid: {message}"
    if not key or isinstance(error.get("input"), dict):  # cross-field: the message names the keys
        return f"params.yaml: {message}"
    return f"params.yaml: {key}={error.get('input')!r} is invalid: {message}"
