"""Stage `tune` (in sweeps/dvc.yaml, so a plain `dvc repro` leaves it out): a Ray Tune sweep of pretraining.

    python -m pipelines.tune                          # the sweep params.yaml's `tune:` describes
    python -m pipelines.tune --resume                 # continue an interrupted one; finished trials stay done
    dvc exp run $(python -m pipelines.tune --adopt)   # the winner's values, as the pipeline's own params

Each trial runs the pretraining loop with the sampled values and reports the monitor's validation kNN top-1
(or the loss) every monitored epoch. Out: sweeps/trials.csv (best first), sweeps/best_params.yaml (params.yaml's
keys), sweeps/sweep.png (the metric against each searched param), sweeps/best.json; one MLflow parent run with
a child run per trial.
"""

import argparse
import shutil
import time
from pathlib import Path

from pipelines.common import PREPARED, ROOT, read_params, run_stage, write_json
from selfsup.data.arrays import Manifest, load_split
from selfsup.errors import ConfigError
from selfsup.methods import check_data
from selfsup.sweep import (
    adopt_flags,
    check_search_space,
    sorted_trials,
    trials_table,
    write_best_params,
    write_trials_csv,
)
from selfsup.train.monitor import KnnMonitor

SWEEPS = ROOT / "sweeps"
BEST_PARAMS = SWEEPS / "best_params.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resume", action="store_true", help="continue the interrupted sweep of the same name")
    parser.add_argument("--adopt", action="store_true", help="print the best trial's values as `dvc exp run` flags")
    args = parser.parse_args()
    if args.adopt:
        print(adopt_flags(BEST_PARAMS))
        return
    params = read_params()
    config = params.tune
    check_search_space(params)  # before Ray starts and before any trial
    manifest = Manifest.read(PREPARED)
    train, val = load_split(PREPARED, "train"), load_split(PREPARED, "val")
    check_data(params.method, train.images, manifest.source)  # colorization on gray images: no trial can learn
    storage = config.storage_path or str(SWEEPS / "ray")
    storage = storage if "://" in storage else str(Path(storage).resolve())

    from selfsup.eval.pictures import plot_sweep
    from selfsup.tracking import TrialRuns, end_sweep_run, sweep_parent_run, use_experiment
    from selfsup.train.ray_trainer import connect_ray
    from selfsup.train.ray_tune import MlflowTrials, run_sweep, sweep_path

    connect_ray()  # an unreachable RAY_ADDRESS fails here, within seconds, before MLflow records a sweep

    path = sweep_path(storage, config.name)
    if not args.resume and "://" not in path and Path(path).exists():
        print(f"starting afresh in {path} (`--resume` continues the sweep there instead)")
        shutil.rmtree(path)
    monitor = KnnMonitor(train.labels, val.images, val.labels, k=params.train.monitor_k)
    tracked = params.model_dump(mode="json", include={"model", "method", "views", "train", "tune"})
    parent = sweep_parent_run(params.mlflow, ROOT, path, tracked, args.resume)  # an unreachable server fails here
    callbacks = [MlflowTrials(TrialRuns(use_experiment(params.mlflow, ROOT), parent))]
    started = time.perf_counter()
    try:
        trials = run_sweep(params, manifest, train.images, monitor, storage, callbacks, resume=args.resume)
    except BaseException:
        end_sweep_run(parent, {}, [], status="FAILED")
        raise
    wall = time.perf_counter() - started

    keys, metric, mode = list(config.space), config.metric, config.resolved_mode
    ranked = sorted_trials(trials, mode)
    write_trials_csv(ranked, keys, metric, SWEEPS / "trials.csv")
    if ranked[0].metric is None:
        end_sweep_run(parent, {}, [SWEEPS / "trials.csv"], status="FAILED")
        raise ConfigError(f"no trial reported {metric}: see each trial's error in sweeps/trials.csv and {path}")
    log_keys = [key for key, distribution in config.space.items() if "loguniform" in distribution]
    values = {key: [t.values[key] for t in ranked] for key in keys}
    finished = [t.status == "completed" for t in ranked]
    plot_sweep(values, [t.metric for t in ranked], metric, mode, log_keys, SWEEPS / "sweep.png", finished)
    write_best_params(ranked[0], metric, BEST_PARAMS)
    summary = {
        f"best_{metric}": ranked[0].metric,
        "trials": len(ranked),
        "stopped_early": sum(t.status == "stopped early" for t in ranked),
        "errors": sum(t.status.startswith("error") for t in ranked),
        "wall_s": round(wall, 1),
    }
    write_json(SWEEPS / "best.json", summary)
    artifacts = [SWEEPS / "trials.csv", SWEEPS / "sweep.png", BEST_PARAMS]
    end_sweep_run(parent, {k: v for k, v in summary.items() if k != "wall_s"}, artifacts)
    print(trials_table(ranked, keys, metric))
    print(
        f"\n{len(ranked)} trials in {wall:.0f} s ({summary['stopped_early']} stopped early by ASHA); best "
        f"{metric} {ranked[0].metric:.4f}, written to {BEST_PARAMS.relative_to(ROOT)}. Adopt it with:\n"
        "  dvc exp run $(python -m pipelines.tune --adopt)"
    )


if __name__ == "__main__":
    run_stage(main)
