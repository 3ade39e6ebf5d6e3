"""How long `dvc repro` takes from a fresh clone: the wall time of each stage and of the whole.

Clones the repository (its committed HEAD, or with --working-tree the files as they are now) into a
temporary folder and runs `dvc repro` there with this Python's environment, streaming DVC's output.
A stage's time runs from DVC's "Running stage 'NAME':" line to the next stage's line (or the end).

    python benchmarks/repro_time.py                                       # the default params
    python benchmarks/repro_time.py --set train.epochs=2 --working-tree   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "ssl")]  # this checkout's pipelines and selfsup, installed or not
from pipelines.recipe import apply  # noqa: E402

RUNNING_STAGE = re.compile(r"Running stage '([^']+)'")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--working-tree", action="store_true", help="copy the files as they are instead of cloning HEAD"
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a param (repeatable)")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "repro_time.json")
    return parser.parse_args()


def clone(destination: Path, working_tree: bool) -> None:
    if not working_tree:
        subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(REPO), str(destination)], check=True)
        return
    # Tracked and untracked files, not the ignored ones (data, models, the venv), as tests/conftest.py copies.
    ls_files = ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
    listed = subprocess.run(ls_files, cwd=REPO, capture_output=True, check=True).stdout.decode()
    for name in filter(None, listed.split("\0")):
        if (REPO / name).is_file():  # a tracked file deleted in the working tree is skipped
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, destination / name)
    git = ["git", "-c", "user.name=repro-time", "-c", "user.email=repro-time@localhost"]
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "working tree"]):  # DVC wants a git repo
        subprocess.run([*git, *command], cwd=destination, check=True)


def override_params(repo: Path, overrides: list[str]) -> None:
    """Apply `a.b=value` overrides to params.yaml; values are read as YAML (2 -> int, null -> None)."""
    path = repo / "params.yaml"
    values = {key: yaml.safe_load(value) for key, _, value in (override.partition("=") for override in overrides)}
    path.write_text(yaml.safe_dump(apply(yaml.safe_load(path.read_text()), values), sort_keys=False))


def stage_env(temporary: Path, repo: Path) -> dict[str, str]:
    """This venv first on PATH, the clone's own library first on PYTHONPATH, private DVC and no remote services."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    # An editable install of selfsup points at this checkout's ssl/: the clone must run its own code.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo / "ssl"), env.get("PYTHONPATH")]))
    env["DVC_SITE_CACHE_DIR"] = str(temporary / "dvc-site-cache")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def repro(repo: Path, env: dict[str, str]) -> tuple[dict[str, float], float]:
    """Run `dvc repro`, echoing its output; returns seconds per stage and in all."""
    started = time.perf_counter()
    stage_starts: list[tuple[str, float]] = []
    with subprocess.Popen(
        ["dvc", "repro"], cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as process:
        for line in process.stdout:
            print(line, end="", flush=True)
            if match := RUNNING_STAGE.search(line):
                stage_starts.append((match.group(1), time.perf_counter()))
    ended = time.perf_counter()
    if process.returncode:
        sys.exit(f"dvc repro failed (exit {process.returncode}); its output is above")
    ends = [start for _, start in stage_starts[1:]] + [ended]
    return {name: end - start for (name, start), end in zip(stage_starts, ends)}, ended - started


def main() -> None:
    args = parse_args()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    source = f"the working tree (HEAD {commit[:10]} + changes)" if args.working_tree else f"HEAD {commit[:10]}"
    with tempfile.TemporaryDirectory(prefix="repro-time-") as folder:
        temporary = Path(folder)
        repo = temporary / "repo"
        clone(repo, args.working_tree)
        override_params(repo, args.set)
        print(f"dvc repro of {source} in {repo}", flush=True)
        stages, total = repro(repo, stage_env(temporary, repo))

    width = max(map(len, [*stages, "total"]))
    print(f"\ndvc repro of {source}, params {' '.join(args.set) or 'as committed'}\n")
    for name, seconds in stages.items():
        print(f"  {name:<{width}}  {seconds:8.1f} s")
    print(f"  {'total':<{width}}  {total:8.1f} s\n")
    report = {
        "source": source,
        "overrides": args.set,
        "stages_s": {name: round(seconds, 2) for name, seconds in stages.items()},
        "total_s": round(total, 2),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
