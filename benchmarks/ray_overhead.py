"""What Ray Train costs: the same training steps in a bare loop and in a one-worker `TorchTrainer`.

Both run one function, `timed_steps`: build a fresh model, take a few warm-up steps, then time the
rest itself, so Ray's start-up stays out of the steps per second. The start-up of `fit()` is reported
apart: from the call to fit() until the train function starts, and until its first timed step.

    python benchmarks/ray_overhead.py                          # small_cnn, batch 256, 16x16 digits
    python benchmarks/ray_overhead.py --steps 5 --warmup 1 --batch-size 32   # the quickest
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "ssl"))

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402

import torch  # noqa: E402

from selfsup.config import DataConfig  # noqa: E402
from selfsup.data.arrays import load_split  # noqa: E402
from selfsup.data.sources import prepare_dataset  # noqa: E402
from selfsup.data.views import view_generator  # noqa: E402
from selfsup.methods import TrainingProgress  # noqa: E402
from selfsup.params import Params  # noqa: E402
from selfsup.train.loop import PretrainSpec, single_process_step  # noqa: E402

CORES = os.cpu_count() or 1


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50, help="timed steps each way")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first, each way")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--backbone", default="small_cnn", choices=["small_cnn", "resnet18"])
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--image-size", type=int, default=16, help="the digits are resized to this")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "ray_overhead.json")
    return parser.parse_args()


def timed_steps(config: dict) -> dict:
    """The per-step work of both runs: warm up, then time `steps` TrainSteps on CPU with `threads` threads."""
    entered_at = time.time()  # wall clock: comparable with the driver's, unlike perf_counter
    torch.set_num_threads(config["threads"])
    spec, steps, warmup = config["spec"], config["steps"], config["warmup"]
    device = torch.device("cpu")
    step = single_process_step(spec, device)
    progress = TrainingProgress(step=0, total_steps=1000, steps_per_epoch=100)  # for the methods' hooks
    data = torch.tensor(config["images"])  # a copy, as train_loop makes (Ray hands over a read-only array)
    generator = view_generator(spec.train.seed, epoch=0, rank=0, device=device)

    def train_step() -> torch.Tensor:
        batch = torch.randint(len(data), (spec.train.batch_size,), generator=generator)
        return step(data[batch], generator, progress)[0]

    for _ in range(warmup):
        train_step()
    first_step_at = time.time()
    started = time.perf_counter()
    for _ in range(steps):
        loss = train_step()
    seconds = time.perf_counter() - started
    return {
        "steps_per_s": steps / seconds,
        "entered_at": entered_at,
        "first_step_at": first_step_at,
        "loss": loss.item(),
        "threads": torch.get_num_threads(),
    }


def through_ray(config: dict) -> tuple[dict, dict]:
    """Run `timed_steps` in a one-worker TorchTrainer; returns its timing and the driver's own."""
    # First: it sets Ray's quiet, private defaults (usage stats, auth token) before Ray is imported.
    from selfsup.train.ray_trainer import connect_ray  # noqa: I001

    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    # Ray's workers import selfsup too: from this checkout even when it is not installed.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "ssl"), os.environ.get("PYTHONPATH")]))
    started = time.time()
    connect_ray()
    connected = time.time()
    with tempfile.TemporaryDirectory() as storage:
        trainer = TorchTrainer(
            timed_steps,
            train_loop_config=config,
            scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": CORES}),
            run_config=ray.train.RunConfig(
                name=f"ray-overhead-{uuid.uuid4().hex[:8]}",  # a reused name would resume
                storage_path=storage,
                logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            ),
        )
        fit_called = time.time()
        result = trainer.fit()
        fit_returned = time.time()
    ray.shutdown()  # its idle processes would otherwise share the cores with the next bare run
    return result.return_value, {
        "ray_init_s": connected - started,
        "fit_called_at": fit_called,
        "fit_s": fit_returned - fit_called,
    }


def main() -> None:
    args = parse_args()
    params = Params.model_validate(
        {"model": {"backbone": args.backbone, "width": args.width}, "train": {"batch_size": args.batch_size}}
    )
    with tempfile.TemporaryDirectory() as folder:
        manifest = prepare_dataset(DataConfig(source="digits", image_size=args.image_size), folder)
        images = load_split(folder, "train", with_labels=False)
    spec = PretrainSpec(
        params.model, params.method, params.views, params.train, manifest.mean, manifest.std, args.image_size
    )
    config = {"images": images, "spec": spec, "steps": args.steps, "warmup": args.warmup, "threads": CORES}

    # Bare runs before and after Ray: on a shared machine the load drifts, and their mean evens it out.
    print(f"bare loop: {args.warmup} warm-up + {args.steps} timed steps ...", flush=True)
    bare_before = timed_steps(config)["steps_per_s"]
    print(f"Ray Train, one worker with {CORES} CPUs: the same ...", flush=True)
    ray_steps, driver = through_ray(config)
    print("bare loop again ...", flush=True)
    bare_after = timed_steps(config)["steps_per_s"]
    bare = (bare_before + bare_after) / 2
    # Both clocks are this machine's wall clock: worker timestamps minus the driver's call of fit().
    startup = ray_steps["entered_at"] - driver["fit_called_at"]
    to_first_step = ray_steps["first_step_at"] - driver["fit_called_at"]

    report = {
        "backbone": args.backbone,
        "width": args.width,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "threads": CORES,
        "bare_steps_per_s": round(bare, 3),
        "bare_before_after_steps_per_s": [round(bare_before, 3), round(bare_after, 3)],
        "ray_steps_per_s": round(ray_steps["steps_per_s"], 3),
        "ratio_ray_over_bare": round(ray_steps["steps_per_s"] / bare, 3),
        "ray_init_s": round(driver["ray_init_s"], 2),
        "fit_startup_s": round(startup, 2),
        "fit_to_first_timed_step_s": round(to_first_step, 2),
        "fit_total_s": round(driver["fit_s"], 2),
    }
    rows = [
        ("bare loop (before, after)", f"{bare_before:.2f}, {bare_after:.2f} steps/s"),
        ("bare loop, mean", f"{report['bare_steps_per_s']:.2f} steps/s"),
        ("Ray Train, 1 worker", f"{report['ray_steps_per_s']:.2f} steps/s"),
        ("ratio ray / bare", f"{report['ratio_ray_over_bare']:.3f}"),
        ("ray.init (connect_ray)", f"{report['ray_init_s']:.1f} s"),
        ("fit() -> train function starts", f"{report['fit_startup_s']:.1f} s"),
        ("fit() -> first timed step", f"{report['fit_to_first_timed_step_s']:.1f} s"),
        ("fit() in all", f"{report['fit_total_s']:.1f} s"),
    ]
    print(
        f"\n{args.backbone} (width {args.width}), batch {args.batch_size}, {args.image_size}x{args.image_size} digits, "
        f"CPU, {CORES} threads; {args.steps} timed steps after {args.warmup} warm-up, each way\n"
    )
    for name, value in rows:
        print(f"  {name:<32}{value:>22}")
    print()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
