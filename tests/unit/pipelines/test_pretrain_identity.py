"""The checkpoint identity of the pretrain stage covers the code a training worker runs, and only that: an edit of
plotting, tracking or sweep code leaves an interrupted run's checkpoints resumable; an edit of the loop does not."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

import pipelines.pretrain as pretrain
from tests.conftest import ROOT

LIBRARY = ROOT / "ssl" / "selfsup"


def test_identity_covers_every_module_a_training_worker_imports():
    script = (
        "import sys, selfsup.train.ray_trainer, selfsup.methods, selfsup.models.torchvision_backbones\n"
        "print('\\n'.join(m.__file__ for n, m in sys.modules.items() if n.startswith('selfsup') and m.__file__))"
    )
    imported = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    covered = {path.resolve() for path in pretrain.training_code_files()}
    assert imported and {Path(name).resolve() for name in imported} <= covered


def test_identity_leaves_out_sweep_plotting_and_tracking_code():
    names = {path.relative_to(LIBRARY).as_posix() for path in pretrain.training_code_files()}
    assert {"train/loop.py", "methods/simclr.py", "models/backbones.py"} <= names
    assert not names & {"train/ray_tune.py", "sweep.py", "eval/pictures.py", "tracking.py", "serving.py"}


def test_dvc_deps_of_pretrain_cover_the_identity_and_no_sweep_code():
    deps = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["pretrain"]["deps"]
    dep_paths = [ROOT / dep for dep in deps]

    def covered(path):
        return any(path == dep or dep in path.parents for dep in dep_paths)

    assert all(covered(path) for path in pretrain.training_code_files())
    assert not covered(LIBRARY / "train" / "ray_tune.py") and not covered(LIBRARY / "sweep.py")


def test_an_edit_outside_the_training_code_keeps_the_identity(tmp_path, monkeypatch):
    copy = tmp_path / "repo"
    shutil.copytree(LIBRARY, copy / "ssl" / "selfsup", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(pretrain, "ROOT", copy)
    before = pretrain.training_code_sha256()
    for name in ("serving.py", "eval/pictures.py", "train/ray_tune.py", "tracking.py"):
        with open(copy / "ssl" / "selfsup" / name, "a") as f:
            f.write("\n# edited during a long run\n")
    assert pretrain.training_code_sha256() == before
    with open(copy / "ssl" / "selfsup" / "train" / "loop.py", "a") as f:
        f.write("\n# the loop changed\n")
    assert pretrain.training_code_sha256() != before
