"""Every shipped recipe prints flags that params.yaml accepts, for every method it names."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from pipelines.recipe import RECIPES
from tests.conftest import ROOT

RECIPE_METHODS = [
    (path.stem, method)
    for path in sorted(RECIPES.glob("*.yaml"))
    for method in yaml.safe_load(path.read_text())
    if method != "common"
]


@pytest.mark.parametrize(("recipe", "method"), RECIPE_METHODS)
def test_every_recipe_is_valid_params(recipe, method):
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.recipe", recipe, method],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert f"-S method.name={method}" in result.stdout


def test_a_recipe_that_does_not_exist_is_named():
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.recipe", "imagenet", "simclr"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 2 and "no recipe 'imagenet'" in result.stderr and "known: cifar10" in result.stderr
