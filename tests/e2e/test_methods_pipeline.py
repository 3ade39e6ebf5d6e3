"""Every method pretrains through Ray Train, on a real cluster, with its knobs read from params.yaml.

One `TorchTrainer.fit()` runs the pretraining loop for each method in turn, through the same `RaySession`
the pretrain stage uses: a fit costs about 10 s of Ray start-up on 2 cores, so one per method would cost
a minute and a half. The stage itself is method-agnostic; test_pipeline.py runs it end to end for SimCLR
and then, switching `method.name` in params.yaml, for BYOL.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from selfsup.methods import METHODS
from tests.conftest import ROOT
from tests.unit.methods.test_training import SMALL_KNOBS

pytestmark = pytest.mark.slow

SCRIPT = """
import json, sys, tempfile
import numpy as np, ray, ray.train, torch, yaml
from ray.train.torch import TorchTrainer
from selfsup.params import load_params
from selfsup.data.sources import resize_square
from selfsup.train.loop import PretrainSpec, build_model, train_loop
from selfsup.train.ray_trainer import RaySession, connect_ray, quiet_ray_train_worker
from sklearn.datasets import load_digits

class FreshSession(RaySession):  # the run's latest checkpoint is the previous method's
    def latest_checkpoint(self):
        return None

def every_method(config):
    quiet_ray_train_worker()
    torch.set_num_threads(2)
    losses = {}
    for name, spec in config["specs"].items():
        initial = build_model(spec, num_images=len(config["images"])).encoder.state_dict()
        # Every method is handed the labels: the loop alone decides that only the supervised reference reads them.
        state = train_loop(config["images"], spec, FreshSession(use_gpu=False), labels=config["labels"])
        final = {k.removeprefix("encoder."): v for k, v in state["method"].items() if k.startswith("encoder.")}
        moved = max(float((final[k] - v).abs().max()) for k, v in initial.items() if v.is_floating_point())
        losses[name] = {"epochs": len(state["history"]), "loss": state["history"][-1]["loss"],
                        "std": state["history"][-1]["embedding_std"], "same_keys": final.keys() == initial.keys(),
                        "encoder_moved": moved}
    return losses

raw = yaml.safe_load(open("params.yaml"))
digits = load_digits()
gray = np.round(digits.images[:512] * (255 / 16)).astype(np.uint8)
images = resize_square(np.repeat(gray[..., None], 3, axis=-1), 16)
specs = {}
for name, knobs in json.loads(sys.argv[1]).items():
    raw["method"]["name"] = name
    raw["method"][name] = {**raw["method"][name], **knobs}
    raw["train"] = {**raw["train"], "epochs": 1, "batch_size": 128, "warmup_epochs": 0}
    params = load_params(raw)
    specs[name] = PretrainSpec(params.model, params.method, params.views, params.train, [0.5] * 3, [0.25] * 3, 16, 10)
connect_ray()
trainer = TorchTrainer(
    every_method,
    train_loop_config={"specs": specs, "images": images, "labels": digits.target[:512]},
    scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 2}),
    run_config=ray.train.RunConfig(storage_path=tempfile.mkdtemp()),
)
print("RESULT", json.dumps(trainer.fit().return_value))
"""


def test_every_method_pretrains_through_ray_train_with_its_params(shared_ray_address):
    knobs = {name: SMALL_KNOBS.get(name, {}) for name in METHODS}
    env = {**os.environ, "RAY_ADDRESS": shared_ray_address, "PYTHONPATH": str(ROOT / "ssl")}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(knobs)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    losses = json.loads(result.stdout.split("RESULT ")[1])
    assert losses.keys() == METHODS.keys()
    for name, outcome in losses.items():
        assert outcome["epochs"] == 1 and outcome["same_keys"], (name, outcome)  # the encoder, whole, is saved
        assert outcome["loss"] == outcome["loss"] and abs(outcome["loss"]) < 1e6, (name, outcome)  # finite
        assert outcome["encoder_moved"] > 1e-4, (name, outcome)  # the method's loss trained the encoder
        assert outcome["std"] > 0.01, (name, outcome)  # its embeddings did not collapse to a point in the epoch


def test_params_yaml_holds_a_section_for_every_method():
    sections = yaml.safe_load((ROOT / "params.yaml").read_text())["method"]
    assert set(METHODS) <= set(sections)
