"""Stage `tune` (in sweeps/dvc.yaml, so a plain `dvc repro` leaves it out): a Ray Tune sweep of pretraining.

    python -m pipelines.tune                          # the sweep params.yaml's `tune:` describes
    python -m pipelines.tune -S tune.num_samples=4 -S tune.name=lr   # params changed for this run, as `dvc exp run -S`
    python -m pipelines.tune --resume                 # continue an interrupted one; finished trials stay done
    dvc exp run $(python -m pipelines.tune --adopt)   # the winner's values, as the pipeline's own params

Each trial runs the pretraining loop with the sampled values and reports the monitor's validation kNN top-1
(or its linear probe's, RankMe of held-out images, the loss) every monitored epoch. Out: sweeps/trials.csv (best
first), sweeps/best_params.yaml (params.yaml's keys), sweeps/sweep.png (the metric against each searched param),
sweeps/best.json; one MLflow parent run with a child run per trial.
"""

import argparse
import time
from pathlib import Path

import yaml

from pipelines.common import PREPARED, ROOT, pretraining_monitor, read_params, run_stage, write_json
from selfsup.config import LABELLED_TUNE_METRICS
from selfsup.data.arrays import Manifest, load_split
from selfsup.errors import ConfigError
from selfsup.methods import check_data
from selfsup.params import Params, load_params, read_yaml
from selfsup.sweep import (
    adopt_flags,
    apply_set_flags,
    check_fresh_start,
    check_search_space,
    parse_set_flags,
    sorted_trials,
    start_afresh,
    sweep_path,
    trials_table,
    write_best_params,
    write_trials_csv,
)

SWEEPS = ROOT / "sweeps"
BEST_PARAMS = SWEEPS / "best_params.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resume", action="store_true", help="continue the interrupted sweep of the same name")
    parser.add_argument("--adopt", action="store_true", help="print the best trial's values as `dvc exp run` flags")
    parser.add_argument(
        "-S",
        "--set-param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change a param of params.yaml for this run (`-S tune.num_samples=4`), as `dvc exp run -S` does",
    )
    args = parser.parse_args()
    if args.adopt:
        print(adopt_flags(BEST_PARAMS))
        return
    params = read_params_with(args.set_param)
    config = params.tune
    check_search_space(params)  # before Ray starts and before any trial
    storage = config.storage_path or str(SWEEPS / "ray")
    storage = storage if "://" in storage else str(Path(storage).resolve())
    path = sweep_path(storage, config.name)
    if not args.resume:
        check_fresh_start(path)  # a folder selfsup did not make for a sweep is refused before anything starts
    manifest = Manifest.read(PREPARED)
    if manifest.streamed:
        raise ConfigError(
            "params.yaml: a sweep holds the training images in memory, and data.streaming wrote them as shards: sweep "
            "on a sample of them (data.root, data.streaming: false), then pretrain on all with the best values"
        )
    train, val = load_split(PREPARED, "train"), load_split(PREPARED, "val")
    check_data(params.method, train.images, manifest.source)  # colorization on gray images: no trial can learn
    if params.labels_missing and config.metric in LABELLED_TUNE_METRICS:  # no trial could report it
        raise ConfigError(
            f"params.yaml: tune.metric={config.metric} needs labelled evaluation data, and {params.labels_missing}: "
            "set tune.metric: monitor_rankme (label-free), or eval.data to a labelled dataset"
        )

    from selfsup.eval.pictures import plot_sweep
    from selfsup.tracking import TrialRuns, end_sweep_run, sweep_parent_run, use_experiment
    from selfsup.train.ray_trainer import connect_ray
    from selfsup.train.ray_tune import MlflowTrials, run_sweep

    connect_ray(params.scaling.dashboard)  # an unreachable RAY_ADDRESS fails here, before MLflow records a sweep

    if not args.resume:
        start_afresh(path)  # deletes the previous sweep of this name (only one selfsup started), marks the new one
    monitor = pretraining_monitor(params, train, val)
    tracked = params.model_dump(mode="json", include={"model", "method", "views", "train", "tune"})
    parent = sweep_parent_run(params.mlflow, ROOT, path, tracked, args.resume)  # an unreachable server fails here
    callbacks = [MlflowTrials(TrialRuns(use_experiment(params.mlflow, ROOT), parent))]
    started = time.perf_counter()
    try:
        labels = train.labels if manifest.labelled else None
        trials = run_sweep(params, manifest, train.images, labels, monitor, storage, callbacks, resume=args.resume)
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
        f"\n{len(ranked)} trials in {wall:.0f} s ({summary['stopped_early']} stopped early); best "
        f"{metric} {ranked[0].metric:.4f}, written to {BEST_PARAMS.relative_to(ROOT)}. Adopt it with:\n"
        "  dvc exp run $(python -m pipelines.tune --adopt)"
    )


def read_params_with(overrides: list[str], path: Path = ROOT / "params.yaml") -> Params:
    """params.yaml with `-S key=value` overrides applied to its raw mapping, then validated as params.yaml is: a
    bad value gets the same one-line error it would get there."""
    if not overrides:
        return read_params(path)
    values = parse_set_flags(overrides)  # a malformed flag fails before the file is read
    try:
        raw = read_yaml(path.read_text())
    except (OSError, yaml.YAMLError):
        return read_params(path)  # raises its one-line error for a missing or broken file
    return load_params(apply_set_flags(raw if isinstance(raw, dict) else {}, values))


if __name__ == "__main__":
    run_stage(main)
