"""What a sweep needs besides Ray: its search space checked against params, each trial's params, the results.

A search space is keyed by params.yaml's own dotted names (`method.simclr.temperature`, `train.lr`), so a
trial's params are the pipeline's params with those keys set, and the winner adopts by the same names.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
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
    node_ip: str = ""  # where it ran: the node's address and Ray's id of it (nodes on one machine share the IP)
    node_id: str = ""


def sorted_trials(trials: list[TrialResult], mode: str) -> list[TrialResult]:
    """Best first by the metric; trials that never reported it last."""
    sign = -1 if mode == "max" else 1
    return sorted(trials, key=lambda t: (t.metric is None or math.isnan(t.metric), sign * (t.metric or 0.0)))


def write_trials_csv(trials: list[TrialResult], keys: list[str], metric: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["trial", metric, "epochs", "status", "node_ip", "node_id", *keys])
        for t in trials:
            score = "" if t.metric is None else t.metric
            writer.writerow([t.trial_id, score, t.epochs, t.status, t.node_ip, t.node_id, *(t.values[k] for k in keys)])


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
    return set_flags(flatten(yaml.safe_load(path.read_text()) or {}))


# `-S key=value` flags, as `dvc exp run` reads them (Hydra's override grammar) and as `$(...)` passes them on.


def set_flags(values: dict[str, Any]) -> str:
    """Dotted keys and values as `-S key=value` flags for `dvc exp run $(...)`: one formatter for every printer.

    `$(...)` splits its output at whitespace and does not re-read quotes, so no value may hold any: a list is
    printed `[0.2,1.0]`, a string that would read as another type (`"1.0"`, `"true"`) is quoted, and a string
    with whitespace in it cannot be passed this way at all (a ConfigError naming the key).
    """
    return " ".join(f"-S {key}={_flag_value(key, value)}" for key, value in values.items())


def _flag_value(key: str, value: Any) -> str:
    if isinstance(value, str) and value.isidentifier() and _reads_back(value):
        text = value
    else:  # JSON is both YAML and Hydra's grammar for numbers, booleans, null, quoted strings and lists
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    if any(c.isspace() for c in text):
        raise ConfigError(
            f"{key}={value!r} holds whitespace, which `$(...)` would split into two words: set it in params.yaml "
            "or pass that -S flag quoted yourself"
        )
    return text


def _reads_back(word: str) -> bool:
    """A bare word that YAML and Hydra both read as this very string (not true, null, nan, on, ...)."""
    return yaml.safe_load(word) == word and word.lower() not in ("nan", "inf", "true", "false", "null")


def parse_set_flags(flags: list[str]) -> dict[str, Any]:
    """`-S key=value` arguments (without the -S) as `dvc exp run` parses them: Hydra's grammar, so `1e-3` is a
    number, `[0.2,1.0]` a list and `{a: 1}` a mapping. Only plain `key=value`; a bad one is a ConfigError."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType
    from hydra.errors import HydraException

    parser, values = OverridesParser.create(), {}
    for flag in flags:
        try:
            (override,) = parser.parse_overrides([flag])
        except HydraException as error:
            reason = str(error).strip().splitlines()[0]
            raise ConfigError(f"-S {flag}: not key=value with a value `dvc exp run -S` reads ({reason})") from None
        if override.type != OverrideType.CHANGE or override.package or override.is_sweep_override():
            raise ConfigError(f"-S {flag}: give one value as key=value (no +, ~, @ or comma-separated sweeps)")
        values[override.key_or_group] = _plain(override.value())
    return values


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def apply_set_flags(raw: dict, values: dict[str, Any]) -> dict:
    """Set dotted keys in a raw params mapping; a key under a value (`tune.name.x`) is a ConfigError."""
    for key, value in values.items():
        node = raw
        for depth, part in enumerate(key.split(".")[:-1]):
            node = node.setdefault(part, {}) if isinstance(node, dict) else None
            if not isinstance(node, dict):
                parent = ".".join(key.split(".")[: depth + 1])
                raise ConfigError(f"-S {key}: params.yaml's {parent} is a value, not a section")
        set_dotted(raw, key, value)
    return raw


# The sweep's folder, storage_path/name: starting afresh deletes it, so only what selfsup made for a sweep.

SWEEP_MARKER = ".selfsup-sweep"  # written into a sweep's folder before Ray writes anything there


def sweep_path(storage_path: str, name: str) -> str:
    if not name.strip(".") or any(c in name for c in "/\\"):  # TuneConfig refuses these; this never deletes above
        raise ConfigError(f"params.yaml: tune.name={name!r} must be a folder name inside tune.storage_path")
    return f"{storage_path.rstrip('/')}/{name}"


def check_fresh_start(path: str) -> None:
    """Refuse, before anything is deleted, to start afresh over a folder that is not a sweep selfsup started.

    A sweep's folder holds SWEEP_MARKER from the moment selfsup makes it. Ray Tune's own state file would not do:
    any Tune experiment has one, and only from Tune's first save, seconds into a sweep.
    """
    folder = Path(path)
    if "://" in path or not (folder.exists() or folder.is_symlink()):
        return
    if folder.is_symlink() or not folder.is_dir() or not (folder / SWEEP_MARKER).is_file():
        raise ConfigError(
            f"{path} exists and is not a sweep selfsup started, so it is left alone: set tune.name to another "
            "name (e.g. -S tune.name=...), or remove that folder yourself"
        )


def start_afresh(path: str) -> None:
    """Delete the previous sweep of this name (check_fresh_start first) and mark the new one's folder as ours."""
    if "://" in path:
        return
    check_fresh_start(path)
    folder = Path(path)
    if folder.exists():
        print(f"starting afresh in {path} (`--resume` continues the sweep there instead)")
        shutil.rmtree(folder)
    mark_sweep_folder(path)


def mark_sweep_folder(path: str) -> None:
    if "://" not in path:
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / SWEEP_MARKER).write_text("a selfsup sweep: `python -m pipelines.tune` may delete this folder\n")


# ASHA decided in the trials' creation order: what trial j does at a rung depends only on the trials created before
# it, never on which trial happened to report first, so a seeded sweep stops the same trials and picks the same
# winner run after run, however many trials run at once.

PENDING = "pending"  # a decision that waits for an earlier trial's report at the same rung


@dataclass
class RungTrial:
    """One trial as ordered ASHA sees it."""

    reports: list[tuple[float, float]] = field(default_factory=list)  # (epoch, metric), in order
    ended: bool = False  # no report will come any more
    unknown: bool = False  # restored by --resume: its reports before the interruption are not known here


def asha_rungs(epochs: int, grace_period: int, reduction_factor: float) -> list[float]:
    """The epochs at which ASHA compares trials: grace_period * reduction_factor^k, below the last epoch."""
    rungs, rung = [], float(grace_period)
    while rung < epochs:
        rungs.append(rung)
        rung *= reduction_factor
    return rungs


def ordered_asha(
    trials: list[RungTrial], rungs: list[float], reduction_factor: float, mode: str, epochs: int
) -> list[int | str | None]:
    """ASHA's decisions as if the trials (in creation order) had run one after another; for each trial the index of
    the report at which it stops, None while it goes on, or PENDING.

    At each report, a trial is compared at the highest rung it has reached and not yet been compared at, with the
    values earlier trials recorded there: below the (1 - 1 / reduction_factor) quantile of them, it stops (as Ray's
    ASHA decides, bar its stop at the last epoch, which changes nothing). The decision waits while an earlier trial
    may still record a value at that rung: one neither ended nor stopped nor past that rung.
    """
    sign = 1.0 if mode == "max" else -1.0
    recorded: dict[float, list[float]] = {rung: [] for rung in rungs}
    settled = math.inf  # every earlier trial has recorded all it ever will at the rungs up to this one
    decisions: list[int | str | None] = []
    for trial in trials:
        if trial.unknown:
            decisions.append(PENDING)
            settled = -math.inf
            continue
        decision, passed = None, -math.inf  # passed: the highest rung this trial was compared at
        for index, (epoch, value) in enumerate(trial.reports):
            reached = [rung for rung in rungs if rung <= epoch]
            if not reached or reached[-1] <= passed:
                continue
            passed = reached[-1]
            if passed > settled:
                decision = PENDING
                break
            earlier = recorded[passed]
            cutoff = np.nanpercentile(earlier, (1 - 1 / reduction_factor) * 100) if earlier else None
            earlier.append(sign * value)
            if cutoff is not None and sign * value < cutoff and epoch < epochs:
                decision = index
                break
        if decision is None and not trial.ended:
            settled = min(settled, passed)
        decisions.append(decision)
    return decisions
