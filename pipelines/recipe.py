"""Print a method's recipe as `dvc exp run` flags: `dvc exp run $(python -m pipelines.recipe cifar10 byol)`.

A recipe file (recipes/<name>.yaml) holds a `common` section and one section per method, each in
params.yaml's shape. The flags are checked against params.yaml before they are printed, so a bad
recipe fails here, not in the middle of an experiment. Later `-S` flags on the command line win.
"""

from __future__ import annotations

import argparse

import yaml

from pipelines.common import ROOT, read_params, run_stage
from selfsup.dotted import flatten, set_dotted
from selfsup.errors import ConfigError
from selfsup.params import load_params
from selfsup.sweep import set_flags

RECIPES = ROOT / "recipes"


def recipe_overrides(recipe: str, method: str) -> dict[str, object]:
    """The recipe's values for a method as dotted keys, common ones first."""
    path = RECIPES / f"{recipe}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in RECIPES.glob("*.yaml")))
        raise ConfigError(f"no recipe {recipe!r} in {RECIPES}; known: {known}")
    sections = yaml.safe_load(path.read_text())
    if method not in sections:
        known = ", ".join(name for name in sections if name != "common")
        raise ConfigError(f"recipe {recipe!r} has no method {method!r}; it has: {known}")
    return {**flatten(sections.get("common", {})), **flatten(sections[method])}


def apply(raw: dict, overrides: dict[str, object]) -> dict:
    for dotted, value in overrides.items():
        set_dotted(raw, dotted, value)
    return raw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", help="a file in recipes/, without .yaml (e.g. cifar10)")
    parser.add_argument("method", help="a method the recipe has (e.g. byol)")
    args = parser.parse_args()
    overrides = recipe_overrides(args.recipe, args.method)
    current = read_params().model_dump(mode="json")
    current["data"]["root"] = current["data"]["root"] or "ROOT"  # the user passes data.root after the recipe
    load_params(apply(current, overrides))  # a bad recipe fails here, naming the key
    print(set_flags(overrides))  # the formatter `--adopt` uses: no whitespace, so `$(...)` keeps each flag whole


if __name__ == "__main__":
    run_stage(main)
