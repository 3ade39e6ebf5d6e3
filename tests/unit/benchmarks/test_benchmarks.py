"""The benchmark scripts run end to end in their tiny configurations and report what they promise."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def run_script(name: str, *args: str, timeout: int, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [sys.executable, f"benchmarks/{name}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_throughput_reports_all_three_figures(tmp_path):
    report = tmp_path / "throughput.json"
    tiny = "--batch-size 16 --steps 2 --warmup 1 --width 0.125 --workers 1 --threads 1 --max-images 256 --no-compile"
    output = run_script("throughput.py", *tiny.split(), "--device", "cpu", "--json", str(report), timeout=300)
    for label in ("(a) model alone", "(b) ours", "(c) torchvision", "(b)/(a)", "(b)/(c)", "eager fp32"):
        assert label in output
    figures = json.loads(report.read_text())["variants"]["eager fp32"]
    for key in ("model_alone", "ours", "torchvision", "ours_over_model_alone", "ours_over_torchvision"):
        assert isinstance(figures[key], float) and figures[key] > 0, (key, figures)
    # The ratios are the figures' own, and the table prints the JSON's numbers.
    assert figures["ours_over_model_alone"] == pytest.approx(figures["ours"] / figures["model_alone"], abs=1e-3)
    assert figures["ours_over_torchvision"] == pytest.approx(figures["ours"] / figures["torchvision"], abs=1e-3)
    assert f"{figures['ours_over_model_alone']:.2f}" in output


@pytest.mark.slow
def test_ray_overhead_reports_a_ratio(tmp_path, shared_ray_address):
    report = tmp_path / "ray_overhead.json"
    tiny = "--steps 3 --warmup 1 --batch-size 32"
    env = {**os.environ, "RAY_ADDRESS": shared_ray_address}
    output = run_script("ray_overhead.py", *tiny.split(), "--json", str(report), timeout=600, env=env)
    assert "ratio ray / bare" in output
    result = json.loads(report.read_text())
    assert isinstance(result["ratio_ray_over_bare"], float) and result["ratio_ray_over_bare"] > 0
    ratio = result["ray_steps_per_s"] / result["bare_steps_per_s"]
    assert result["ratio_ray_over_bare"] == pytest.approx(ratio, abs=2e-3)
    assert result["bare_steps_per_s"] == pytest.approx(sum(result["bare_before_after_steps_per_s"]) / 2, abs=2e-3)
    assert 0 < result["fit_startup_s"] <= result["fit_to_first_timed_step_s"] <= result["fit_total_s"]


def test_method_speed_times_every_method_beside_simclr(tmp_path):
    from selfsup.methods import METHODS

    report = tmp_path / "method_speed.json"
    tiny = "--batch-size 8 --steps 1 --warmup 1 --width 0.125 --max-images 64"
    output = run_script("method_speed.py", *tiny.split(), "--device", "cpu", "--json", str(report), timeout=300)
    assert "/ simclr" in output
    figures = json.loads(report.read_text())["images_per_s"]
    assert figures.keys() == METHODS.keys()
    assert all(isinstance(f["eager fp32"], float) and f["eager fp32"] > 0 for f in figures.values())
    # Each row prints the method's images/s and its ratio to SimCLR's, from the same figures as the JSON.
    simclr = figures["simclr"]["eager fp32"]
    for method, f in figures.items():
        row = next(line for line in output.splitlines() if line.startswith(f"{method} "))
        assert row.split()[1:] == [f"{f['eager fp32']:,.1f}", f"{f['eager fp32'] / simclr:.2f}"], row
