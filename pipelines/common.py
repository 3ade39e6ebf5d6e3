"""What every stage shares: the repo's paths, params.yaml read and validated, errors made readable."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

import yaml

from selfsup.config import Params, load_params
from selfsup.errors import ConfigError, SelfsupError

ROOT = Path(__file__).resolve().parent.parent
PREPARED = ROOT / "data" / "prepared"
CHECKPOINTS = ROOT / "checkpoints"
ENCODER = ROOT / "models" / "encoder.pt"
FEATURES = ROOT / "features" / "features.npz"
METRICS = ROOT / "metrics"
PLOTS = ROOT / "plots"


def read_params(path: Path = ROOT / "params.yaml") -> Params:
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"no {path}: copy params.yaml from the repository") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    return load_params(raw)


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


def write_scores_against_baseline(name: str, label: str, score: Callable[..., float]) -> None:
    """Score the pretrained encoder's features and the random-init baseline's the same way, and write
    metrics/<name>.json with `top1` and `baseline_top1`. `score(train_x, train_y, test_x, test_y)`."""
    from selfsup.eval.features import load_features

    f = load_features(FEATURES)
    top1 = {
        encoder: score(f[f"{encoder}_train"], f["train_labels"], f[f"{encoder}_test"], f["test_labels"])
        for encoder in ("pretrained", "baseline")
    }
    write_json(
        METRICS / f"{name}.json", {"top1": round(top1["pretrained"], 4), "baseline_top1": round(top1["baseline"], 4)}
    )
    print(f"{label}: {top1['pretrained']:.2%} pretrained vs {top1['baseline']:.2%} random init")
