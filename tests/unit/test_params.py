"""params.yaml validation: every bad value becomes one ConfigError line naming the key and the value."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from selfsup.config import DataConfig, ScalingConfig, ViewConfig
from selfsup.errors import ConfigError
from selfsup.methods import METHODS
from selfsup.params import ADAMW_LR, Params, learning_rate, load_params
from tests.conftest import ROOT

if str(ROOT) not in sys.path:  # `pipelines` is imported from the repo root (python -m pytest adds it too)
    sys.path.insert(0, str(ROOT))

from pipelines.common import read_params  # noqa: E402

REPO_PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


def with_change(path: str, value) -> dict:
    """The repo's params with one key (dotted path) set to value."""
    raw = copy.deepcopy(REPO_PARAMS)
    *parents, last = path.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return raw


def config_error(raw: dict) -> str:
    with pytest.raises(ConfigError) as caught:
        load_params(raw)
    message = str(caught.value)
    assert "\n" not in message, f"expected one line, got:\n{message}"
    assert message.startswith("params.yaml: ")
    return message


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("method.name", "simclrr", ["method.name", "'simclrr'", "simclr"]),
        ("model.backbone", "resnet51", ["model.backbone", "'resnet51'", "small_cnn", "resnet50", "vit_tiny"]),
        ("method.simclr.temperature", 0, ["method.simclr.temperature", "=0 ", "greater than 0"]),
        ("method.simclr.temperature", -0.25, ["method.simclr.temperature", "-0.25"]),
        ("method.moco.queue_size", 0, ["method.moco.queue_size", "=0 "]),
        ("method.swav.local_crop_scale", [0.5, 0.1], ["method.swav.local_crop_scale", "0 < low <= high <= 1"]),
        ("train.lr", 0.0, ["train.lr", "0.0"]),
        ("train.lr", -0.3, ["train.lr", "-0.3"]),
        ("train.weight_decay", -0.0005, ["train.weight_decay", "-0.0005"]),
        ("views.crop_scale", [0.0, 1.0], ["views.crop_scale", "[0.0, 1.0]", "0 < low <= high <= 1"]),
        ("views.crop_scale", [0.9, 0.5], ["views.crop_scale", "[0.9, 0.5]"]),
        ("views.crop_scale", [0.5, 1.5], ["views.crop_scale", "[0.5, 1.5]"]),
        ("views.flip_prob", 1.5, ["views.flip_prob", "1.5"]),
        ("scaling.num_workers", 0, ["scaling.num_workers", "=0 "]),
        ("data.source", "imagenet", ["data.source", "'imagenet'", "imagefolder"]),
        ("train.optimizer", "lamb", ["train.optimizer", "'lamb'", "sgd", "adamw", "lars"]),
    ],
)
def test_bad_value_names_key_and_value(key: str, value, expected: list[str]) -> None:
    message = config_error(with_change(key, value))
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"


def test_batch_too_small_for_the_method() -> None:
    message = config_error(with_change("train.batch_size", 1))
    assert "train.batch_size=1" in message
    assert "simclr" in message
    assert "at least 2" in message


def test_batch_too_small_per_worker() -> None:
    raw = with_change("train.batch_size", 4)
    raw["scaling"]["num_workers"] = 4  # 1 image per worker: SimCLR needs 2
    message = config_error(raw)
    assert "train.batch_size=4" in message and "at least 8" in message


def test_batch_not_divisible_by_workers() -> None:
    raw = with_change("train.batch_size", 10)
    raw["scaling"]["num_workers"] = 3
    message = config_error(raw)
    assert "train.batch_size=10" in message
    assert "scaling.num_workers=3" in message


def test_warmup_must_end_before_training() -> None:
    raw = with_change("train.warmup_epochs", 5)
    raw["train"]["epochs"] = 5
    message = config_error(raw)
    assert "train.warmup_epochs=5 must be below train.epochs=5" in message and "\n" not in message


def test_views_larger_than_the_stored_images_are_refused_before_prepare_writes_them() -> None:
    message = config_error(with_change("views.size", 24))  # data.image_size is 16
    assert "views.size=24 is larger than data.image_size=16" in message and "\n" not in message
    assert load_params(with_change("views.size", 12)).views.size == 12


@pytest.mark.parametrize(
    "key, named",
    [
        ("train.lrr", "train.lrr"),
        ("method.temprature", "method.temprature"),
        ("views.flip_probability", "views.flip_probability"),
        ("eval.knn.kk", "eval.knn.kk"),
        ("trian.lr", "trian"),  # an unknown section is named as a whole
    ],
)
def test_unknown_key_is_named(key: str, named: str) -> None:
    message = config_error(with_change(key, 0.1))
    assert f"params.yaml: {named} is not a known key" in message


@pytest.mark.parametrize("source", ["cifar10", "cifar100", "stl10", "imagefolder"])
def test_non_digits_source_needs_root(source: str) -> None:
    message = config_error(with_change("data.source", source))
    assert "data.root" in message
    assert repr(source) in message


def test_non_digits_source_with_root_is_valid() -> None:
    raw = with_change("data.source", "imagefolder")
    raw["data"]["root"] = "/somewhere"
    assert load_params(raw).data.root == "/somewhere"


def test_several_problems_give_one_line_each() -> None:
    raw = with_change("train.lr", -1.0)
    raw["method"]["name"] = "byoll"
    raw["model"]["colour"] = "red"
    with pytest.raises(ConfigError) as caught:
        load_params(raw)
    lines = str(caught.value).splitlines()
    assert len(lines) == 3
    assert any("train.lr" in line and "-1.0" in line for line in lines)
    assert any("method.name" in line and "'byoll'" in line for line in lines)
    assert any("model.colour" in line for line in lines)


def test_shipped_params_yaml_equals_the_code_defaults() -> None:
    """One source of truth: a key deleted from params.yaml takes the value it had."""
    assert load_params(REPO_PARAMS) == Params()

    def keys(node: dict, prefix: str = "") -> set[str]:
        nested = {k for key, v in node.items() if isinstance(v, dict) for k in keys(v, f"{prefix}{key}.")}
        return {prefix + key for key in node} | nested

    # Every knob is listed in params.yaml, each method's section included, so users see them all.
    assert keys(REPO_PARAMS) == keys(Params().model_dump())


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_is_chosen_by_name_alone(name: str) -> None:
    """`dvc exp run -S method.name=NAME` on the shipped params.yaml just works."""
    params = load_params(with_change("method.name", name))
    assert params.method.knobs == METHODS[name].Knobs()
    assert params.method.knobs is getattr(params.method, name)


def test_a_knob_of_another_method_names_its_section() -> None:
    message = config_error(with_change("method.simclr.queue_size", 1024))
    assert message == "params.yaml: method.simclr.queue_size is not a knob of simclr; queue_size belongs in method.moco"
    message = config_error(with_change("method.byol.temperature", 0.1))
    assert "method.byol.temperature is not a knob of byol" in message
    assert "method.simclr and method.moco and method.swav" in message


def test_a_method_section_can_be_left_out() -> None:
    raw = copy.deepcopy(REPO_PARAMS)
    del raw["method"]["byol"]
    raw["method"]["name"] = "byol"
    assert load_params(raw).method.knobs == METHODS["byol"].Knobs()


@pytest.mark.parametrize("method", list(METHODS))
def test_auto_lr_is_the_methods_own_scaled_linearly_with_the_batch(method: str) -> None:
    params = load_params({"method": {"name": method}, "train": {"batch_size": 512}})
    assert params.train.lr == "auto"
    assert learning_rate(params.train, params.method) == pytest.approx(METHODS[method].lr * 2)
    adamw = load_params({"method": {"name": method}, "train": {"batch_size": 128, "optimizer": "adamw"}})
    assert learning_rate(adamw.train, adamw.method) == pytest.approx(ADAMW_LR / 2)


def test_a_number_for_lr_is_used_as_it_is_whatever_the_method_and_batch() -> None:
    params = load_params({"method": {"name": "moco"}, "train": {"batch_size": 64, "lr": 0.7}})
    assert learning_rate(params.train, params.method) == 0.7


@pytest.mark.parametrize("bad", ["fast", 0, -0.1, float("inf"), True])
def test_lr_must_be_positive_or_auto(bad) -> None:
    with pytest.raises(ConfigError, match=r'train.lr=.* is invalid: must be a number > 0, or "auto"'):
        load_params({"train": {"lr": bad}})


def test_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        load_params({"train": {"lr": 0}})


def test_empty_params_give_the_defaults() -> None:
    assert load_params(None) == Params()
    assert load_params({}) == Params()


def test_sections_are_frozen() -> None:
    params = load_params({})
    with pytest.raises(Exception):
        params.train.lr = 1.0  # type: ignore[misc]


def test_direct_constructors_validate_too() -> None:
    with pytest.raises(ValueError, match="data.root"):
        DataConfig(source="cifar10")
    with pytest.raises(ValueError):
        ViewConfig(crop_scale=(0.0, 1.0))
    with pytest.raises(ValueError):
        ScalingConfig(num_workers=0)


def test_repo_params_yaml_validates() -> None:
    params = read_params()
    assert isinstance(params, Params)
    assert params.data.source == REPO_PARAMS["data"]["source"]
    assert params.train.batch_size == REPO_PARAMS["train"]["batch_size"]
    assert params.views.crop_scale == tuple(REPO_PARAMS["views"]["crop_scale"])
    assert params.method.name in METHODS


def test_read_params_reports_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no .*params.yaml"):
        read_params(tmp_path / "params.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_params(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("train:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"train\.lrr"):
        read_params(typo)


def test_numbers_dvc_writes_are_read_as_numbers(tmp_path: Path) -> None:
    """`dvc exp run -S train.lr=1e-5` writes `lr: 1e-05` (YAML 1.2, no dot), which YAML 1.1 reads as a string."""
    from dvc.utils.serialize import modify_yaml

    path = tmp_path / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text())
    with modify_yaml(path) as raw:  # what `dvc exp run -S` does to params.yaml
        raw["train"].update(lr=1e-5, weight_decay=1e-6)
    assert "lr: 1e-05" in path.read_text()
    params = read_params(path)
    assert (params.train.lr, params.train.weight_decay) == (1e-5, 1e-6)
    assert params.train.epochs == REPO_PARAMS["train"]["epochs"] and isinstance(params.train.epochs, int)


# --- how a stage reports an error ----------------------------------------------------------------

STAGE_SCRIPT = """
import sys
from pipelines.common import run_stage
from selfsup.errors import ConfigError
from selfsup.methods import METHODS

def main():
    print("stage started")
    raise {error}

run_stage(main)
print("not reached")
"""


def run_script(script: str, env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env
    )


def test_run_stage_prints_one_line_and_exits_2_on_config_error() -> None:
    result = run_script(STAGE_SCRIPT.format(error="ConfigError('params.yaml: train.lr=-1 is invalid: must be > 0')"))
    assert result.returncode == 2
    assert result.stderr.strip() == "error: params.yaml: train.lr=-1 is invalid: must be > 0"
    assert "Traceback" not in result.stderr
    assert "stage started" in result.stdout and "not reached" not in result.stdout


def test_run_stage_handles_a_real_validation_error() -> None:
    script = (
        "from pipelines.common import run_stage\n"
        "from selfsup.params import load_params\n"
        "run_stage(lambda: load_params({'method': {'name': 'simclrr'}}))\n"
    )
    result = run_script(script)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: params.yaml: method.name='simclrr'")


def test_run_stage_lets_bugs_raise_with_a_traceback() -> None:
    # Only the errors a user can act on are shortened; a bug keeps its traceback and a non-2 exit.
    result = run_script(STAGE_SCRIPT.format(error="RuntimeError('a bug')"))
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "RuntimeError: a bug" in result.stderr


@pytest.mark.slow
def test_more_workers_than_ray_can_place_is_a_config_error(shared_ray_address) -> None:
    script = """
import ray
from selfsup.config import ScalingConfig
from selfsup.errors import ConfigError
from selfsup.methods import METHODS
from selfsup.train.ray_trainer import check_resources, connect_ray

connect_ray()
try:
    check_resources(ScalingConfig(num_workers=1, cpus_per_worker=1))  # fits on any machine
    print("ONE WORKER OK")
    for scaling in (ScalingConfig(num_workers=64), ScalingConfig(num_workers=1, use_gpu=True)):
        try:
            check_resources(scaling)
        except ConfigError as error:
            print("CONFIG ERROR:", error)
        else:
            print("NO ERROR for", scaling)
finally:
    ray.shutdown()
"""
    result = run_script(script, env={**os.environ, "RAY_ADDRESS": shared_ray_address}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ONE WORKER OK" in result.stdout
    assert "NO ERROR" not in result.stdout
    errors = [line for line in result.stdout.splitlines() if line.startswith("CONFIG ERROR:")]
    assert len(errors) == 2, result.stdout
    too_many, no_gpu = errors
    assert "scaling.num_workers=64" in too_many and "CPU" in too_many
    assert "GPU" in no_gpu and "scaling.use_gpu: false" in no_gpu


def test_a_method_section_built_elsewhere_is_validated_again():
    from selfsup.config import MethodConfig
    from selfsup.params import Params

    with pytest.raises(ValidationError, match="unknown method"):
        Params(method=MethodConfig(name="nope"))
    assert Params(method=MethodConfig(name="byol")).method.knobs.momentum == 0.99  # its own section, defaulted
