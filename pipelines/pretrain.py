"""Stage `pretrain`: Ray Train pretraining -> models/encoder.pt, metrics/pretrain.json, per-epoch curves.

The run is tracked in MLflow (params, per-epoch loss, lr, images/s, validation kNN and the collapse
statistics as step metrics, the curves as a picture); the evaluations and `register` add to that run.

Checkpoints live in checkpoints/<run name>, a folder DVC keeps between runs (persist), and the run
name is a hash of everything that shapes the result (params, data, the training code in TRAINING_CODE):
an interrupted `dvc repro` resumes where it stopped, while a change of those starts afresh. Other
configurations' checkpoints are removed only once a run has succeeded.
"""

import csv
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from pipelines.common import (
    CHECKPOINTS,
    ENCODER,
    METRICS,
    PLOTS,
    PREPARED,
    ROOT,
    pretraining_monitor,
    read_params,
    run_stage,
    write_json,
)
from selfsup.data.arrays import Manifest, file_sha256, load_split
from selfsup.data.shards import Shards, check_shards
from selfsup.errors import ConfigError
from selfsup.eval.features import extract_features
from selfsup.methods import check_data, uses_labels
from selfsup.models import save_encoder
from selfsup.train.collapse import rankme
from selfsup.train.loop import PretrainSpec, build_model


def main() -> None:
    params = read_params()
    manifest = Manifest.read(PREPARED)
    train_count = manifest.splits["train"]["count"]
    if params.train.batch_size > train_count:  # caught here, before Ray starts
        raise ConfigError(
            f"params.yaml: train.batch_size={params.train.batch_size} exceeds the {train_count} training "
            f"images of {manifest.source}; allowed: at most {train_count}"
        )
    val = load_split(PREPARED, "val")
    if manifest.streamed:  # the training images stay in their shards; the held-out ones stand for them here
        uri, files = manifest.shards(PREPARED)
        check_shards(uri, files)
        train, images = None, Shards(uri, files, train_count)
    else:
        train = load_split(PREPARED, "train")
        images = train.images
    check_data(params.method, val.images if train is None else train.images, manifest.source)  # before Ray starts
    if not manifest.labelled and uses_labels(params.method, params.train):
        raise ConfigError(
            f"params.yaml: method.name={params.method.name} with train.label_loss_weight="
            f"{params.train.label_loss_weight} trains on labels, and data.source={manifest.source} has none: "
            "pick a self-supervised method and set train.label_loss_weight: 0"
        )
    spec = PretrainSpec.from_params(params, manifest)
    scaling = params.scaling.model_dump(exclude={"max_failures", "dashboard"})  # what changes the result
    identity = json.dumps([repr(spec), scaling, manifest.sha256, training_code_sha256()])
    run_name = f"{params.method.name}-{hashlib.sha256(identity.encode()).hexdigest()[:12]}"

    import mlflow

    from selfsup.errors import TrainingStoppedError
    from selfsup.tracking import ENCODER_TAG, log_history, pretrain_run  # fails fast on an unreachable MLflow server
    from selfsup.train.ray_trainer import checkpoint_kept, pretrain_with_ray  # Ray only once params are good

    monitor = pretraining_monitor(params, train, val)
    device = "cuda" if params.scaling.use_gpu else "cpu"
    tracked = params.model_dump(mode="json", include={"data", "model", "method", "views", "train", "scaling"})
    tags = {
        "stage": "pretrain",
        "device": device,
        "workers": str(params.scaling.num_workers),
        "method": params.method.name,
    }
    with pretrain_run(params.mlflow, ROOT, params=tracked, tags=tags) as run_id:
        started = time.perf_counter()
        try:
            labels = train.labels if train is not None and manifest.labelled else None
            state = pretrain_with_ray(images, spec, params.scaling, CHECKPOINTS, run_name, monitor, labels)
        except TrainingStoppedError as error:  # a NaN loss, a collapse: the run keeps its curves up to the stop
            log_history(run_id, error.history)
            raise
        except KeyboardInterrupt:
            print(f"\ninterrupted: {checkpoint_kept(CHECKPOINTS / run_name)}", file=sys.stderr, flush=True)
            raise
        wall = time.perf_counter() - started

        method = build_model(spec, num_images=train_count)
        method.load_state_dict(state["method"])
        save_encoder(method.encoder, ENCODER, manifest.image_size)
        history = state["history"]
        _write_curves(history)
        summary = {
            "final_loss": history[-1]["loss"],
            "epochs": len(history),
            "images_per_s": round(sum(h["images_per_s"] for h in history) / len(history), 1),
            "wall_s": round(wall, 1),
        }
        if "monitor_knn_top1" in history[-1]:
            summary["val_knn_top1"] = history[-1]["monitor_knn_top1"]
        # Label-free: RankMe of the encoder's representations of held-out images (mlflow.champion_metric: rankme),
        # of the final encoder, also with train.monitor_every: 0.
        on = "cuda" if params.scaling.use_gpu and torch.cuda.is_available() else "cpu"
        features = extract_features(method.encoder.eval(), monitor.held_out, params.eval.batch_size, on)
        summary.update(rankme=round(rankme(torch.from_numpy(features)), 2), rankme_images=len(monitor.held_out))
        write_json(METRICS / "pretrain.json", summary)
        log_history(run_id, history)
        mlflow.log_metrics({f"pretrain.{k}": v for k, v in summary.items()})
        mlflow.log_artifact(str(PLOTS / "pretrain.png"), artifact_path="pictures")
        mlflow.log_artifact(str(PLOTS / "pretrain.csv"), artifact_path="curves")
        mlflow.set_tag(ENCODER_TAG, file_sha256(ENCODER))
    # Done: a forced re-run trains afresh, and no other configuration's checkpoints can be resumed by this one.
    for folder in CHECKPOINTS.iterdir():
        if folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)
    (CHECKPOINTS / "README").write_text(CHECKPOINTS_README)
    print(
        f"pretrained {len(history)} epochs in {wall:.0f} s; encoder saved to {ENCODER.relative_to(ENCODER.parents[1])}"
    )


CHECKPOINTS_README = """\
Ray Train checkpoints of the pretrain stage, one folder per configuration (a hash of the params).
DVC keeps this folder between runs (persist: true) so that an interrupted `dvc repro` resumes from
the latest checkpoint; a finished run removes its own folder.
"""


def _write_curves(history: list[dict]) -> None:
    """plots/pretrain.csv (every epoch), the monitored epochs' plots/monitor.csv (kNN top-1, with labels) and
    plots/rankme.csv, and plots/pretrain.png."""
    from selfsup.eval.pictures import plot_training_curves

    PLOTS.mkdir(exist_ok=True)
    columns = [key for key in history[0] if not key.startswith("monitor_")]
    with open(PLOTS / "pretrain.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
    with open(PLOTS / "monitor.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", "val_knn_top1"])
        writer.writerows([row["epoch"], row["monitor_knn_top1"]] for row in history if "monitor_knn_top1" in row)
    with open(PLOTS / "rankme.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", "rankme"])
        writer.writerows([row["epoch"], row["monitor_rankme"]] for row in history if "monitor_rankme" in row)
    plot_training_curves(history, PLOTS / "pretrain.png")


# The code whose change makes a checkpoint stale (what a training worker runs), relative to ssl/selfsup; not the
# plotting, tracking or sweep code. tests/unit/pipelines/test_pretrain_identity.py checks that it covers every
# module a worker imports and that dvc.yaml's pretrain deps cover it.
TRAINING_CODE = (
    "methods",
    "models",
    "train/loop.py",
    "train/step.py",
    "train/optim.py",
    "train/collapse.py",
    "train/monitor.py",
    "train/ray_trainer.py",
    "train/__init__.py",
    "data/views.py",
    "data/lab.py",
    "data/arrays.py",
    "data/shards.py",
    "data/__init__.py",
    "eval/knn.py",
    "eval/linear.py",
    "eval/features.py",
    "eval/__init__.py",
    "distributed.py",
    "config.py",
    "params.py",
    "errors.py",
    "reachability.py",
    "ray_cluster.py",
    "__init__.py",
)


def training_code_files() -> list[Path]:
    library = ROOT / "ssl" / "selfsup"
    files = []
    for entry in TRAINING_CODE:
        path = library / entry
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return files


def training_code_sha256() -> str:
    """Changed training code must not resume a checkpoint that older code trained."""
    digest = hashlib.sha256()
    for path in training_code_files():
        digest.update(str(path.relative_to(ROOT)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


if __name__ == "__main__":
    run_stage(main)
