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
