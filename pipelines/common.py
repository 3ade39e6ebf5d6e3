"""What every stage shares: the repo's paths, params.yaml read and validated, errors made readable."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import yaml

from selfsup.data.arrays import MANIFEST, Manifest, Split, load_split
from selfsup.errors import ConfigError, SelfsupError
from selfsup.params import Params, load_params, read_yaml

if TYPE_CHECKING:
    from selfsup.train.monitor import Monitor

ROOT = Path(__file__).resolve().parent.parent
PREPARED = ROOT / "data" / "prepared"
CHECKPOINTS = ROOT / "checkpoints"
ENCODER = ROOT / "models" / "encoder.pt"
FEATURES = ROOT / "features" / "features.npz"
TRANSFER = ROOT / "data" / "transfer"  # the transfer target, prepared like data/prepared
# The labelled evaluation data (eval.data, or STL-10's labelled splits), prepared like data/prepared; without it the
# folder holds only a note, and the evaluations read the pretraining data's own splits.
EVAL_DATA = ROOT / "data" / "eval"
TRANSFER_FEATURES = ROOT / "features" / "transfer.npz"
LABEL_SUBSETS = ROOT / "data" / "label_subsets.json"
METRICS = ROOT / "metrics"
PLOTS = ROOT / "plots"


def read_params(path: Path = ROOT / "params.yaml") -> Params:
    try:
        raw = read_yaml(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"no {path}: copy params.yaml from the repository") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    return load_params(raw)


def evaluation_data() -> Path:
    """The folder of the labelled data the evaluations (and the pretraining monitor) read: data/eval when the
    prepare_eval stage wrote a dataset there, else the pretraining data's own, data/prepared."""
    return EVAL_DATA if (EVAL_DATA / MANIFEST).is_file() else PREPARED


def pretraining_monitor(params: Params, train: Split | None, val: Split) -> Monitor:
    """What pretraining (and each sweep trial) watches: RankMe of a sample of the pretraining data's held-out
    images (`val`), and with labelled evaluation data, kNN top-1 on its validation split (`train` and `val` are
    the pretraining data's splits, which are that data when it is labelled; `train` is None when streamed, which
    only unlabelled sources are)."""
    from selfsup.train.collapse import rankme_sample
    from selfsup.train.monitor import LabelledProbe, Monitor

    held_out = rankme_sample(val.images, params.train.seed)
    folder = evaluation_data()
    manifest = Manifest.read(folder)
    if not manifest.labelled:
        return Monitor(held_out)
    if folder == PREPARED:  # the pretraining images are the kNN's bank: no second copy
        assert train is not None, "labelled pretraining data is held in memory"
        return Monitor(held_out, LabelledProbe(train.labels, val.images, val.labels, k=params.train.monitor_k))
    bank, labelled_val = load_split(folder, "train"), load_split(folder, "val")
    probe = LabelledProbe(bank.labels, labelled_val.images, labelled_val.labels, bank.images, params.train.monitor_k)
    return Monitor(held_out, probe)


def missing_labels(manifest: Manifest) -> str | None:
    """Why the evaluations that need labels cannot run on this (evaluation) data; None when they can."""
    if manifest.labelled:
        return None
    return f"data.source={manifest.source} has no labels and eval.data is not set: set eval.data to a labelled dataset"


def write_skipped(stage: str, reason: str, metrics: Path, pictures: tuple[Path, ...] = (), tables=()) -> None:
    """A stage that cannot run without labels writes its reason where its numbers would go, a picture saying so,
    and its tables' header rows (`tables`: (path, columns) pairs): `dvc repro` goes on, and the reason shows in
    `dvc metrics show`, MLflow and the README's commands."""
    from selfsup.eval.pictures import plot_note

    write_json(metrics, {"skipped": reason})
    for path in pictures:
        plot_note(f"{stage}: skipped, {reason}", path)
    for path, columns in tables:
        path.write_text(",".join(columns) + "\n")
    print(f"{stage}: skipped: {reason}")


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage; an expected failure prints one clear line (no traceback) and exits 2."""
    try:
        main()
    except (SelfsupError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def log_to_encoder_run(params: Params, protocol: str, metrics: dict, pictures: list[Path] = ()) -> None:
    """An evaluation's metrics (named `<protocol>.<key path>`) and pictures, in the MLflow run that trained
    the encoder."""
    from selfsup.data.arrays import file_sha256
    from selfsup.eval.protocol import metric_values
    from selfsup.tracking import log_evaluation

    log_evaluation(params.mlflow, ROOT, file_sha256(ENCODER), metric_values(metrics, protocol + "."), list(pictures))


def champion_knn_k(name: str) -> int | None:
    """mlflow.champion_metric's k: "knn_k20_top1" -> 20; None for "linear_top1"."""
    return int(name.removeprefix("knn_k").removesuffix("_top1")) if name.startswith("knn_k") else None


def champion_metric_key(name: str) -> str:
    """mlflow.champion_metric -> the validation metric it names (the champion is never chosen on test); rankme,
    label-free, is measured on held-out images at the end of pretraining."""
    if name == "rankme":
        return "pretrain.rankme"
    k = champion_knn_k(name)
    return "linear.val.top1.mean" if k is None else f"knn.val.k{k}.top1"
