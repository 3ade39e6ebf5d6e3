"""What a sweep needs besides Ray: its search space checked against params, each trial's params, the results.

A search space is keyed by params.yaml's own dotted names (`method.simclr.temperature`, `train.lr`), so a
trial's params are the pipeline's params with those keys set, and the winner adopts by the same names.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from selfsup.dotted import flatten, nested, set_dotted
from selfsup.errors import ConfigError
from selfsup.params import Params, load_params

# A trial pretrains and is judged on what pretraining reports: keys elsewhere would change nothing it measures.
TUNABLE_SECTIONS = ("model", "method", "views", "train")
PROBED = "monitor_linear_top1"  # with this metric, the monitor's linear probe (eval.linear.*) shapes a trial too


def tunable(key: str, metric: str) -> bool:
    return key.split(".")[0] in TUNABLE_SECTIONS or (metric == PROBED and key.startswith("eval.linear."))


def trial_params(params: Params, sampled: dict[str, Any]) -> Params:
    """The params one trial trains with: the sweep's epochs, the sampled values, and a report each monitored epoch.

    With the monitor's accuracy as the metric, a trial checkpoints (and so reports) exactly when the monitor
    measures: every report then carries the metric the scheduler compares.
    """
    raw = params.model_dump(mode="json")
    set_dotted(raw, "train.epochs", params.tune.epochs)
    if params.tune.metric.startswith("monitor_"):
        if not params.train.monitor_every:
            raise ConfigError(
                f"params.yaml: tune.metric={params.tune.metric} needs the monitor: set train.monitor_every to 1 or more"
            )
        set_dotted(raw, "train.checkpoint_every", params.train.monitor_every)
    for key, value in sampled.items():
        set_dotted(raw, key, value)
    return load_params(raw)


def check_search_space(params: Params) -> None:
    """Refuse, before any trial starts, a key params.yaml lacks or no trial uses, and a bound params would reject.

    Each problem is one line naming the key; the endpoints of each range and every choice are validated as
    the trial params they would make.
    """
    raw = params.model_dump(mode="json")
    problems = []
    for key, distribution in params.tune.space.items():
        where = f"params.yaml: tune.space.{key}"
        node: Any = raw
        for part in key.split("."):
            node = node.get(part, KeyError) if isinstance(node, dict) else KeyError
        if node is KeyError:
            problems.append(f"{where}: params.yaml has no key {key!r}; use the dotted name of a value there")
            continue
        if isinstance(node, dict):
            problems.append(f"{where}: {key!r} is a section, not a value; name one of its keys")
            continue
        if not tunable(key, params.tune.metric):
            problems.append(
                f"{where}: a trial pretrains and is judged by tune.metric={params.tune.metric}, which {key!r} does "
                f"not change; search keys under {', '.join(TUNABLE_SECTIONS)} (and eval.linear with {PROBED})"
            )
            continue
        ((kind, values),) = distribution.items()
        for value in values:
            try:
                trial_params(params, {key: value})
            except ConfigError as error:
                reason = str(error).splitlines()[0].removeprefix("params.yaml: ")
                problems.append(f"{where}: the {kind} value {value!r} is not allowed ({reason})")
                break
    if not problems:
        trial_params(params, {})  # the sweep's own settings (epochs against warm-up, the monitor)
    if problems:
        raise ConfigError("\n".join(problems))


@dataclass(frozen=True)
class TrialResult:
    trial_id: str
    values: dict[str, Any]  # the sampled params, by their dotted names
    metric: float | None  # the last reported value of tune.metric; None when it never reported
    epochs: int  # epochs it ran
    status: str  # completed | stopped early | error: ...


def sorted_trials(trials: list[TrialResult], mode: str) -> list[TrialResult]:
    """Best first by the metric; trials that never reported it last."""
    sign = -1 if mode == "max" else 1
    return sorted(trials, key=lambda t: (t.metric is None or math.isnan(t.metric), sign * (t.metric or 0.0)))


def write_trials_csv(trials: list[TrialResult], keys: list[str], metric: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["trial", metric, "epochs", "status", *keys])
        for t in trials:
            writer.writerow(
                [t.trial_id, "" if t.metric is None else t.metric, t.epochs, t.status, *(t.values[k] for k in keys)]
            )


def trials_table(trials: list[TrialResult], keys: list[str], metric: str) -> str:
    """The sorted trials as a Markdown table (what the stage prints)."""
    header = ["trial", metric, "epochs", "status", *keys]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for t in trials:
        score = "" if t.metric is None else f"{t.metric:.4f}"
        cells = [
            t.trial_id,
            score,
            str(t.epochs),
            t.status,
            *(f"{t.values[k]:.4g}" if isinstance(t.values[k], float) else str(t.values[k]) for k in keys),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_best_params(best: TrialResult, metric: str, path: Path) -> None:
    """The winner's values in params.yaml's shape, with what it scored as a comment."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = f"# best trial {best.trial_id}: {metric} {best.metric:.4f} after {best.epochs} epochs\n"
    path.write_text(header + yaml.safe_dump(nested(best.values), sort_keys=False))


def adopt_flags(path: Path) -> str:
    """best_params.yaml as `dvc exp run` flags: `dvc exp run $(python -m pipelines.tune --adopt)`."""
    if not path.is_file():
        raise FileNotFoundError(f"no {path}: run a sweep first (`python -m pipelines.tune`)")
    flat = flatten(yaml.safe_load(path.read_text()) or {})
    return " ".join(f"-S {key}={value}" for key, value in flat.items())
