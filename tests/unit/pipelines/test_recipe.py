"""Every shipped recipe gives values that params.yaml accepts, for every method it names; the command prints them
as `dvc exp run` flags."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from pipelines.recipe import RECIPES, apply, recipe_overrides
from selfsup.methods import method_views
from selfsup.params import load_params
from tests.conftest import ROOT

RECIPE_METHODS = [
    (path.stem, method)
    for path in sorted(RECIPES.glob("*.yaml"))
    for method in yaml.safe_load(path.read_text())
    if method != "common"
]


@pytest.mark.parametrize(("recipe", "method"), RECIPE_METHODS)
def test_every_recipe_is_valid_params(recipe, method):
    shipped = yaml.safe_load((ROOT / "params.yaml").read_text())
    shipped["data"]["root"] = "ROOT"  # the user passes data.root after the recipe
    params = load_params(apply(shipped, recipe_overrides(recipe, method)))
    assert params.method.name == method


def test_the_stl10_and_imagenet_recipes_pretrain_as_the_papers_do():
    stl10 = load_params(apply({"data": {"root": "ROOT"}}, recipe_overrides("stl10", "simclr")))
    assert (stl10.data.stl10_split, stl10.data.image_size, stl10.model.stem) == ("train+unlabeled", 96, "imagenet")
    imagenet = load_params(apply({"data": {"root": "ROOT"}}, recipe_overrides("imagenet", "dino")))
    assert (imagenet.data.source, imagenet.data.streaming, imagenet.data.image_size) == ("folder", True, 256)
    assert imagenet.views.size == 224  # crops of the stored 256 px images, as the papers train
    assert (imagenet.model.backbone, imagenet.model.stem) == ("resnet50", "imagenet")
    sizes = [view.size for view in method_views(imagenet.method, imagenet.views, imagenet.data.image_size)]
    assert sizes == [224] * 2 + [96] * 6  # of the stored 256 px images


def test_the_command_prints_the_flags_and_names_a_recipe_that_does_not_exist():
    def recipe(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "pipelines.recipe", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)

    printed = recipe("cifar10", "byol")
    assert printed.returncode == 0, printed.stderr
    assert "-S method.name=byol" in printed.stdout and "-S data.image_size=32" in printed.stdout
    missing = recipe("nosuch", "simclr")
    assert missing.returncode == 2 and "no recipe 'nosuch'" in missing.stderr and "known: cifar10" in missing.stderr
