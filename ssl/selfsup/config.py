"""Typed, validated sections of params.yaml that know nothing of methods or backbones.

`selfsup.params` assembles them, with each registered method's knobs and the backbone builders, into the
`Params` every stage validates before it spends any compute; the library itself only ever sees these
objects. This module imports no other part of selfsup but its errors, so that methods and models can import it.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    field_validator,
    model_validator,
)


def one_of(value: str, allowed, what: str) -> str:
    """Registries are open-ended (a new method is a new file), so names are checked here, not by Literal."""
    if value not in allowed:
        raise ValueError(f"unknown {what}; allowed: {', '.join(allowed)}")
    return value


def _valid_scale(value: tuple[float, float]) -> tuple[float, float]:
    low, high = value
    if not 0 < low <= high <= 1:
        raise ValueError("must be [low, high] with 0 < low <= high <= 1")
    return value


def _positive_or_auto(value: Any) -> float | Literal["auto"]:
    if value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise ValueError('must be a number > 0, or "auto"')
    return float(value)


CropScale = Annotated[tuple[float, float], AfterValidator(_valid_scale)]  # area fractions of a random crop


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


SOURCES = ("digits", "mnist", "cifar10", "cifar100", "stl10", "imagefolder", "folder", "filelist")
UNLABELLED_SOURCES = ("folder", "filelist")  # images only: pretraining needs no labels
LABELLED_SOURCES = tuple(source for source in SOURCES if source not in UNLABELLED_SOURCES)
EMBEDDED_SOURCES = ("digits", "mnist")  # shipped inside installed packages: no root, no download
# STL-10's images: 5,000 labelled (train), 100,000 without labels (unlabeled), or both, as the papers pretrain.
STL10_SPLITS = ("train", "unlabeled", "train+unlabeled")


class DataConfig(_Section):
    source: Literal[SOURCES] = "digits"
    # The dataset's folder (torchvision's files; imagefolder's root/<class>/ images). folder: every image below
    # it, in any structure, without labels (a list of folders reads them all). filelist: a text file naming
    # one image per line (relative to the file's own folder, or absolute).
    root: str | list[str] | None = None
    download: bool = False  # let torchvision download a missing dataset (needs internet)
    image_size: int | None = Field(default=16, ge=8, le=512)  # square resize; None keeps native
    test_fraction: float = Field(default=0.2, gt=0, lt=1)  # when the source has no test split
    # Held out of train, labels and all: the pretraining monitor and every choice (champion, sweeps) use it,
    # so that the test split is only ever reported.
    val_fraction: float = Field(default=0.1, gt=0, lt=1)
    seed: int = 0
    # imagefolder: an image whose header says more pixels is skipped as unreadable before any is decoded (a
    # small PNG can decode to gigabytes). Default: Pillow's own limit (1 GiB / 4 / 3, ~9459 x 9459, 256 MiB as
    # RGB), above the 12-50 MP of phone and camera photos, and what Pillow would warn about anyway.
    max_image_pixels: int = Field(default=89_478_485, ge=1)
    # imagefolder: the share of files that may be unreadable (truncated, not an image, over max_image_pixels):
    # skipped with a one-line warning naming them; more is an error. 0 makes any unreadable file an error.
    max_unreadable_fraction: float = Field(default=0.01, ge=0, lt=1)
    # stl10: the images pretraining reads. With unlabeled ones they carry no labels, and the evaluations read
    # STL-10's labelled train and test splits (unless eval.data names another dataset).
    stl10_split: Literal[STL10_SPLITS] = "train"
    # folder, filelist: past memory_budget_gb of prepared images (uint8, image_size squared), or always with true,
    # prepare writes the training images as Parquet shards of JPEGs at data.image_size, and pretraining streams them
    # with Ray Data instead of holding them in each worker's memory. The validation split stays in memory.
    streaming: Literal["auto", True, False] = "auto"
    memory_budget_gb: float = Field(default=8.0, gt=0)
    shards_uri: str | None = None  # where the shards go: null is data/prepared/shards; file://, s3://, gs:// URIs
    images_per_shard: int = Field(default=8192, ge=1)

    @model_validator(mode="after")
    def _root_when_needed(self) -> DataConfig:
        if self.source not in EMBEDDED_SOURCES and not self.root:
            raise ValueError(f"data.root is required for data.source={self.source!r}: set it to the dataset folder")
        if isinstance(self.root, list) and self.source != "folder":
            raise ValueError(f"data.root is a list, which only data.source=folder reads; {self.source} reads one")
        if self.streaming is True and self.source not in UNLABELLED_SOURCES:
            raise ValueError(
                f"data.streaming: true applies to data.source folder and filelist (unlabelled), not {self.source}"
            )
        if self.streaming is True and not self.image_size:
            raise ValueError("data.streaming: true needs data.image_size: the shards hold images of one size")
        if self.stl10_split != "train" and self.source != "stl10":
            raise ValueError(
                f"data.stl10_split={self.stl10_split} applies to data.source=stl10 only; remove it for {self.source}"
            )
        return self

    @property
    def labelled(self) -> bool:
        """Whether the images pretraining reads carry labels (which then also serve the evaluations)."""
        return self.source not in UNLABELLED_SOURCES and self.stl10_split == "train"

    def labelled_splits(self) -> EvalDataConfig | None:
        """The same dataset's labelled splits, where pretraining reads its unlabelled ones (STL-10's)."""
        if self.source == "stl10" and self.stl10_split != "train":
            return EvalDataConfig(source="stl10", root=self.root, download=self.download, seed=self.seed)
        return None


class ModelConfig(_Section):
    backbone: str = "small_cnn"  # one of selfsup.models.BACKBONE_BUILDERS, checked by selfsup.params
    width: float = Field(default=1.0, gt=0, le=8)  # channel multiplier of small_cnn and the ResNets
    zero_init_residual: bool = False  # zero each residual block's last BN scale (ResNets, RegNets)
    # cifar: a stride-1 3x3 conv and no max-pool, for 16-64 px; imagenet: torchvision's own (a stride-2 7x7 conv and a
    # max-pool for ResNets: a quarter of the resolution, 1/16 of the compute after it; a stride-2 3x3 for RegNets)
    stem: Literal["cifar", "imagenet"] = "cifar"
    patch_size: int = Field(default=4, ge=1)  # ViT patch side: 4 at 32x32 gives 64 tokens


class MethodKnobs(_Section):
    """Base of a method's own knobs. Each method declares its subclass beside its code, in
    selfsup.methods; params.yaml holds them in the section method.<name>."""


class MethodConfig(_Section):
    """`name` picks the method; `method.<name>` holds each method's knobs (the sections selfsup.params adds from
    the registry of methods, which also checks the name)."""

    name: str = "simclr"

    @property
    def knobs(self) -> MethodKnobs:
        """The chosen method's knobs."""
        return getattr(self, self.name)


class ViewConfig(_Section):
    """Augmentations that make each view; probabilities are per image."""

    # The views' side in pixels. null: the stored resolution (data.image_size). Smaller: the random resized crops
    # of the stored images come out at this size, as ImageNet recipes store about 256 px and train at 224; the
    # evaluations and the registered model still read the stored size. Multi-crop's local views scale to it.
    size: int | None = Field(default=None, ge=8, le=512)
    crop_scale: CropScale = (0.4, 1.0)  # area fraction of the random resized crop
    flip_prob: float = Field(default=0.0, ge=0, le=1)  # digits are not mirror-symmetric
    jitter_prob: float = Field(default=0.8, ge=0, le=1)
    jitter_strength: float = Field(default=0.4, ge=0, le=1)  # brightness/contrast/saturation; hue/4
    grayscale_prob: float = Field(default=0.0, ge=0, le=1)
    blur_prob: float = Field(default=0.0, ge=0, le=1)
    solarize_prob: float = Field(default=0.0, ge=0, le=1)


class TrainConfig(_Section):
    epochs: int = Field(default=80, ge=1)
    batch_size: int = Field(default=256, ge=1)  # global: split evenly across workers
    optimizer: Literal["sgd", "adamw", "lars"] = "sgd"
    # "auto": the method's own learning rate for SGD and LARS (its `lr`, at batch 256), or 5e-4 for AdamW,
    # scaled linearly with train.batch_size (Goyal et al., 2017). A number is used as it is.
    lr: Annotated[float | Literal["auto"], PlainValidator(_positive_or_auto)] = "auto"
    lars_trust_coefficient: float = Field(default=0.02, gt=0)  # LARS's eta (solo-learn's CIFAR value)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=5e-4, ge=0)
    warmup_epochs: int = Field(default=2, ge=0)
    seed: int = 0
    checkpoint_every: int = Field(default=10, ge=1)  # epochs between checkpoints (the last always is one)
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 autocast applies on CUDA only
    compile: bool = False  # torch.compile the model
    # Collapse: the std of the L2-normalised embeddings, times sqrt(dim) (about 1 healthy, 0 collapsed).
    collapse_std: float = Field(default=0.05, ge=0)  # stop when it stays below this ...
    collapse_patience: int = Field(default=3, ge=1)  # ... for this many epochs in a row
    # kNN top-1 on the validation split every this many epochs (and the last); 0 turns it off. Its labels
    # serve this monitor only: no method sees them.
    monitor_every: int = Field(default=5, ge=0)
    monitor_k: int = Field(default=20, ge=1)
    # Self-supervision as an auxiliary loss: this weight x a labelled cross-entropy (a linear head on the encoder's
    # features of the first view) added to the method's loss. 0: labels never reach pretraining.
    label_loss_weight: float = Field(default=0.0, ge=0)


class ScalingConfig(_Section):
    num_workers: int = Field(default=1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=2.0, gt=0)
    gpus_per_worker: float = Field(default=1.0, gt=0)  # used only when use_gpu
    # A worker lost mid-run (killed, its node gone) is restarted from the latest checkpoint this many times.
    max_failures: int = Field(default=3, ge=0)
    # The local Ray instance's dashboard (and job server), on 127.0.0.1 and behind its token; off unless asked.
    dashboard: bool = False


def _k_list(value: Any) -> Any:
    return [value] if isinstance(value, int) and not isinstance(value, bool) else value


def _distinct_sorted(values: list) -> list:
    if not values:
        raise ValueError("must hold at least one value")
    if len(set(values)) != len(values):
        raise ValueError("must not repeat a value")
    return sorted(values)


class KnnConfig(_Section):
    # Several k in one pass (the neighbours are ranked once); top-1 is reported for each.
    k: Annotated[list[Annotated[int, Field(ge=1)]], BeforeValidator(_k_list), AfterValidator(_distinct_sorted)] = [
        10,
        20,
        200,
    ]
    temperature: float = Field(default=0.07, gt=0)


class LinearConfig(_Section):
    epochs: int = Field(default=50, ge=1)
    lr: float = Field(default=0.01, gt=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    weight_decay: float = Field(default=1e-4, ge=0)
    batch_size: int = Field(default=256, ge=1)


class SemisupConfig(_Section):
    """Fine-tuning the whole encoder plus a linear head on a fraction of the training labels."""

    fractions: Annotated[list[Annotated[float, Field(gt=0, le=1)]], AfterValidator(_distinct_sorted)] = [0.01, 0.1, 1.0]
    subset_seed: int = 0  # draws the class-balanced subsets once: every method is judged on the same images
    steps: int = Field(default=100, ge=1)  # the same budget at every fraction
    batch_size: int = Field(default=64, ge=1)
    lr: float = Field(default=0.003, gt=0)  # the encoder's; the new head learns head_lr_multiplier times faster
    head_lr_multiplier: float = Field(default=10.0, gt=0)
    weight_decay: float = Field(default=5e-4, ge=0)
    crop_scale: CropScale = (0.5, 1.0)  # light augmentation: a random resized crop ...
    flip_prob: float = Field(default=0.0, ge=0, le=1)  # ... and a flip (off for digits)


class _LabelledSource(_Section):
    """A labelled dataset the evaluations read: the same sources as `data` (their labelled ones), at the size of
    the pretraining images, read under data's limits (data.max_*, data.val_fraction)."""

    section: ClassVar[str]
    source: Literal[LABELLED_SOURCES]
    root: str | None = None
    download: bool = False
    test_fraction: float = Field(default=0.2, gt=0, lt=1)  # when the source has no test split
    seed: int = 0

    @field_validator("source", mode="before")
    @classmethod
    def _has_labels(cls, value: Any) -> Any:
        if value in UNLABELLED_SOURCES:
            raise ValueError(
                f"{value} has no labels, which {cls.section} needs: pick a labelled source "
                f"({', '.join(LABELLED_SOURCES)})"
            )
        return value

    @model_validator(mode="after")
    def _root_when_needed(self) -> _LabelledSource:
        if self.source not in EMBEDDED_SOURCES and not self.root:
            section = self.section
            raise ValueError(
                f"{section}.root is required for {section}.source={self.source!r}: set it to the dataset folder"
            )
        return self


class TransferConfig(_LabelledSource):
    """The target dataset of transfer: another dataset, judged on the frozen encoder."""

    section: ClassVar[str] = "eval.transfer"
    source: Literal[LABELLED_SOURCES] = "mnist"


class EvalDataConfig(_LabelledSource):
    """The labelled dataset that the monitor, kNN, linear probe and fine-tuning read when it is not the pretraining
    data's own: for pretraining images without labels, or to judge every encoder on one fixed dataset."""

    section: ClassVar[str] = "eval.data"


class EvalConfig(_Section):
    batch_size: int = Field(default=512, ge=1)  # feature extraction
    # The random-init baseline's BatchNorm statistics are re-estimated on this many training batches (of
    # batch_size) before any protocol scores it; 0 keeps the initialisation's (mean 0, variance 1).
    baseline_batchnorm_batches: int = Field(default=20, ge=0)
    # Every evaluation that trains (linear probe, fine-tuning) runs once per seed: mean and spread are reported.
    seeds: Annotated[list[int], AfterValidator(_distinct_sorted)] = [0, 1, 2]
    knn: KnnConfig = KnnConfig()
    linear: LinearConfig = LinearConfig()
    semisup: SemisupConfig = SemisupConfig()
    transfer: TransferConfig = TransferConfig()
    # null: the pretraining data's own labelled splits (STL-10's train and test when pretraining reads unlabeled).
    data: EvalDataConfig | None = None


class MlflowConfig(_Section):
    tracking_uri: str = "sqlite:///mlflow.db"  # MLFLOW_TRACKING_URI overrides it
    experiment: str = "selfsup"
    model_name: str = Field(default="selfsup-encoder", min_length=1)
    # Decided on the validation split, never on test: knn_k<K>_top1 (K one of eval.knn.k), linear_top1, or
    # rankme (label-free: RankMe of held-out images' representations, measured at the end of pretraining).
    champion_metric: str = "knn_k20_top1"


DISTRIBUTIONS = ("loguniform", "uniform", "choice")
# What a trial reports each monitored epoch: the monitor's kNN, its linear probe (eval.linear.*, searchable), the loss.
# RankMe needs no labels: the one for pretraining images without them.
TUNE_METRICS = {"monitor_knn_top1": "max", "monitor_linear_top1": "max", "monitor_rankme": "max", "loss": "min"}
LABELLED_TUNE_METRICS = ("monitor_knn_top1", "monitor_linear_top1")


def _one_distribution(value: Any) -> Any:
    """`{loguniform: [low, high]}`, `{uniform: [low, high]}` or `{choice: [a, b, ...]}`."""
    if not isinstance(value, dict) or len(value) != 1:
        raise ValueError(f"must be one of {{{', '.join(f'{d}: [...]' for d in DISTRIBUTIONS)}}}")
    ((kind, arguments),) = value.items()
    if kind not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {kind!r}; allowed: {', '.join(DISTRIBUTIONS)}")
    if not isinstance(arguments, list) or not arguments:
        raise ValueError(f"{kind} takes a list: [low, high] or the choices")
    if kind == "choice":
        return value
    numbers = len(arguments) == 2 and all(isinstance(a, int | float) and not isinstance(a, bool) for a in arguments)
    if not numbers:
        raise ValueError(f"{kind} takes [low, high], two numbers")
    low, high = arguments
    if not low < high:
        raise ValueError(f"the low bound {low} must be below the high bound {high}")
    if kind == "loguniform" and low <= 0:
        raise ValueError(f"loguniform needs a low bound above 0, not {low}")
    return value


Distribution = Annotated[dict[str, list], PlainValidator(_one_distribution)]


class AshaConfig(_Section):
    """ASHA (Li et al., 2020): trials reach rung grace_period * reduction_factor^i epochs; the worse ones stop."""

    grace_period: int = Field(default=2, ge=1)  # epochs every trial runs before it can be stopped
    reduction_factor: float = Field(default=2.0, gt=1)  # 1 / reduction_factor of the trials go on at each rung


class TuneConfig(_Section):
    """A Ray Tune sweep of pretraining (`python -m pipelines.tune`). Its space is keyed by params.yaml's own names."""

    space: dict[str, Distribution] = {
        "method.simclr.temperature": {"loguniform": [0.1, 1.0]},
        "train.lr": {"loguniform": [0.05, 1.0]},
    }
    num_samples: int = Field(default=8, ge=1)
    epochs: int = Field(default=20, ge=1)  # train.epochs of each trial
    # The monitor's validation kNN top-1, its linear probe's, RankMe of held-out images (no labels), or the loss.
    metric: str = "monitor_knn_top1"
    mode: Literal["max", "min"] | None = None  # null: the metric's own (max for accuracy, min for the loss)
    search: Literal["random", "optuna"] = "random"  # optuna: pip install -e ".[optuna]"
    seed: int = 0  # of the search's draws: the same params give the same trials
    # asha: ASHA decided in the trials' creation order, so the same seed picks the same winner however their
    # reports interleave | async_asha: Ray's ASHAScheduler (decisions follow report timing) | fifo: no early stop
    scheduler: Literal["asha", "async_asha", "fifo"] = "asha"
    asha: AshaConfig = AshaConfig()  # the rungs of both ASHAs
    cpus_per_trial: float = Field(default=1.0, gt=0)
    gpus_per_trial: float = Field(default=0.0, ge=0)  # a fraction lets small trials share a GPU
    max_concurrent_trials: int | None = Field(default=2, ge=1)  # null: as many as the resources allow
    storage_path: str | None = None  # null: sweeps/ray in the repo; on a cluster a shared folder or s3://, gs://
    name: str = "sweep"  # a folder name under storage_path, never a path

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        return one_of(value, TUNE_METRICS, "metric (what a trial reports)")

    @field_validator("asha", mode="before")
    @classmethod
    def _asha_settings(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("null no longer turns early stopping off: set tune.scheduler: fifo")
        return value

    @field_validator("name")
    @classmethod
    def _folder_name(cls, value: str) -> str:
        # The stage deletes storage_path/name to start a sweep afresh: a name must stay inside storage_path.
        allowed = all(c.isascii() and (c.isalnum() or c in "_.-") for c in value)
        if not value or not allowed or set(value) == {"."}:
            raise ValueError(
                "must be a folder name inside tune.storage_path (letters, digits, _ . -), not a path, '.' or '..'"
            )
        return value

    @property
    def resolved_mode(self) -> str:
        return self.mode or TUNE_METRICS[self.metric]
