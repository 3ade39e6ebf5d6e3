"""Typed, validated configuration: the one place where bad params are caught.

Every pipeline stage turns `params.yaml` into a `Params` object before it spends any compute; the
library itself only ever sees these objects. A problem becomes a `ConfigError` whose lines each name
the key, the value and what is allowed.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from selfsup.errors import ConfigError

# Names and per-worker minimum batch of each method; the classes live in selfsup.methods, which
# checks at import that it implements exactly these (kept here so config stays free of torch).
METHOD_MIN_BATCH = {"simclr": 2}
BACKBONES = ("small_cnn", "resnet18")


def _one_of(value: str, allowed, what: str) -> str:
    """Registries are open-ended (a new method is a new file), so names are checked here, not by Literal."""
    if value not in allowed:
        raise ValueError(f"unknown {what}; allowed: {', '.join(allowed)}")
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    source: Literal["digits", "cifar10", "cifar100", "stl10", "imagefolder"] = "digits"
    root: str | None = None  # folder of a torchvision or imagefolder source
    download: bool = False  # let torchvision download a missing dataset (needs internet)
    image_size: int | None = Field(default=None, ge=8, le=512)  # square resize; None keeps native
    test_fraction: float = Field(default=0.2, gt=0, lt=1)  # when the source has no test split
    seed: int = 0

    @model_validator(mode="after")
    def _root_when_needed(self) -> DataConfig:
        if self.source != "digits" and not self.root:
            raise ValueError(f"data.root is required for data.source={self.source!r}: set it to the dataset folder")
        return self


class ModelConfig(_Section):
    backbone: str = "small_cnn"
    width: float = Field(default=1.0, gt=0, le=8)  # channel multiplier

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, value: str) -> str:
        return _one_of(value, BACKBONES, "backbone")


class MethodConfig(_Section):
    name: str = "simclr"
    temperature: float = Field(default=0.2, gt=0)
    projection_hidden_dim: int = Field(default=512, ge=1)
    projection_dim: int = Field(default=128, ge=1)

    @field_validator("name")
    @classmethod
    def _known_method(cls, value: str) -> str:
        return _one_of(value, METHOD_MIN_BATCH, "method")


class ViewConfig(_Section):
    """Augmentations that make each view; probabilities are per image."""

    crop_scale: tuple[float, float] = (0.2, 1.0)  # area fraction of the random resized crop
    flip_prob: float = Field(default=0.5, ge=0, le=1)
    jitter_prob: float = Field(default=0.8, ge=0, le=1)
    jitter_strength: float = Field(default=0.4, ge=0, le=1)  # brightness/contrast/saturation; hue/4
    grayscale_prob: float = Field(default=0.2, ge=0, le=1)
    blur_prob: float = Field(default=0.0, ge=0, le=1)
    solarize_prob: float = Field(default=0.0, ge=0, le=1)

    @field_validator("crop_scale")
    @classmethod
    def _valid_scale(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0 < low <= high <= 1:
            raise ValueError("must be [low, high] with 0 < low <= high <= 1")
        return value


class TrainConfig(_Section):
    epochs: int = Field(default=30, ge=1)
    batch_size: int = Field(default=256, ge=1)  # global: split evenly across workers
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(default=0.3, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=1e-4, ge=0)
    warmup_epochs: int = Field(default=1, ge=0)
    seed: int = 0
    checkpoint_every: int = Field(default=5, ge=1)  # epochs between checkpoints (the last always is one)
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 autocast applies on CUDA only
    compile: bool = False  # torch.compile the model


class ScalingConfig(_Section):
    num_workers: int = Field(default=1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1.0, gt=0)
    gpus_per_worker: float = Field(default=1.0, gt=0)  # used only when use_gpu


class KnnConfig(_Section):
    k: int = Field(default=20, ge=1)
    temperature: float = Field(default=0.07, gt=0)


class LinearConfig(_Section):
    epochs: int = Field(default=100, ge=1)
    lr: float = Field(default=0.01, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    batch_size: int = Field(default=256, ge=1)


class EvalConfig(_Section):
    batch_size: int = Field(default=512, ge=1)  # feature extraction
    knn: KnnConfig = KnnConfig()
    linear: LinearConfig = LinearConfig()


class MlflowConfig(_Section):
    tracking_uri: str = "sqlite:///mlflow.db"  # MLFLOW_TRACKING_URI overrides it
    experiment: str = "selfsup"
    model_name: str = Field(default="selfsup-encoder", min_length=1)
    champion_metric: Literal["knn_top1", "linear_top1"] = "knn_top1"


class Params(_Section):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    method: MethodConfig = MethodConfig()
    views: ViewConfig = ViewConfig()
    train: TrainConfig = TrainConfig()
    scaling: ScalingConfig = ScalingConfig()
    eval: EvalConfig = EvalConfig()
    mlflow: MlflowConfig = MlflowConfig()

    @model_validator(mode="after")
    def _warmup_ends_before_training(self) -> Params:
        if self.train.warmup_epochs >= self.train.epochs:
            raise ValueError(
                f"train.warmup_epochs={self.train.warmup_epochs} must be below train.epochs={self.train.epochs}: "
                "the learning rate would never reach train.lr nor decay"
            )
        return self

    @model_validator(mode="after")
    def _batch_fits_method(self) -> Params:
        workers, batch = self.scaling.num_workers, self.train.batch_size
        if batch % workers:
            raise ValueError(f"train.batch_size={batch} must divide evenly across scaling.num_workers={workers}")
        needed = METHOD_MIN_BATCH[self.method.name]
        if batch // workers < needed:
            raise ValueError(
                f"train.batch_size={batch} is too small for method {self.method.name!r}: each of "
                f"{workers} worker(s) needs at least {needed} images; raise train.batch_size to "
                f"at least {needed * workers}"
            )
        return self


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
        return f"params.yaml: {key} is not a known key (a typo?); remove or rename it"
    if not key or isinstance(error.get("input"), dict):  # cross-field: the message names the keys
        return f"params.yaml: {message}"
    return f"params.yaml: {key}={error.get('input')!r} is invalid: {message}"
