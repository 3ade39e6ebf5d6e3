"""The training step runs where only PyTorch is installed: no Ray, MLflow or DVC on the import path."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT

# Runs first in a fresh interpreter: any import of a blocked package fails as if it were not installed.
BLOCK_IMPORTS = """
import sys

class Blocked:
    names = {"ray", "mlflow", "dvc"}

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in self.names:
            raise ImportError(f"{name} is blocked: the training step must not need it")
        return None

sys.meta_path.insert(0, Blocked())
try:
    import ray
except ImportError:
    pass
else:
    raise AssertionError("the import blocker let ray through")
"""

TRAIN_ONE_STEP = """
import math
import torch

import selfsup.data.views
import selfsup.train.loop
import selfsup.train.step
from selfsup.params import load_params
from selfsup.data.views import view_generator
from selfsup.methods import TrainingProgress
from selfsup.train.loop import PretrainSpec, single_process_step

params = load_params({"model": {"backbone": "small_cnn", "width": 0.25}, "train": {"batch_size": 8}})
spec = PretrainSpec(params.model, params.method, params.views, params.train, [0.5] * 3, [0.25] * 3, 16)
device = torch.device("cpu")
step = single_process_step(spec, device)
images = torch.randint(0, 256, (8, 16, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
loss = step(images, view_generator(0, 0, 0, device), TrainingProgress(0, 1, 1))[0].item()
assert math.isfinite(loss), loss
assert "ray" not in sys.modules
assert not [m for m in sys.modules if m.partition(".")[0] in ("ray", "mlflow", "dvc")]
print(f"loss {loss:.4f}")
"""


def test_training_step_imports_and_runs_without_ray_mlflow_or_dvc():
    code = BLOCK_IMPORTS + TRAIN_ONE_STEP  # the blocker first, before anything imports
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT / "ssl")},  # this checkout's library, installed or not
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("loss "), result.stdout
