"""Peak resident memory of the driver and the Ray Train worker while pretraining, streamed against in memory, as
the dataset grows.

Synthetic colour images (smooth random patterns with noise, JPEG at quality 95 in the shards) at 32 px, in sets
of 10k, 100k and 400k by default. Each set is pretrained for one epoch through the same `pretrain_with_ray` on a
private Ray instance: once as the uint8 array `pretrain` loads for data that fits (the driver holds it and puts it
in Ray's object store, the worker reads it there), once as Parquet shards that Ray Data reads and decodes. A thread
samples the resident set size (RSS) of this process (the driver) and of every process of its Ray instance every
0.2 s. Shared memory (Ray's object store) counts in the RSS of each process that maps it, as the kernel counts it.
The model is a quarter-width small CNN, so that one epoch of 400k images takes minutes on 2 cores (at 64 px, 4x as
long): memory, not speed, is measured here (benchmarks/streaming.py measures speed).

    python benchmarks/streaming_memory.py                       # 10k, 100k, 400k at 32 px (~30 min on 2 cores)
    python benchmarks/streaming_memory.py --sizes 2000 8000     # a minute
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "ssl"))  # a plain checkout works without `pip install`

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import psutil  # noqa: E402

from selfsup.data.shards import Shards, ShardWriter  # noqa: E402
from selfsup.params import load_params  # noqa: E402
from selfsup.train.loop import PretrainSpec  # noqa: E402

MIB = 1 << 20
CHUNK = 1024  # images generated at a time


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 400_000])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--paths", nargs="+", choices=["in memory", "streamed"], default=["in memory", "streamed"])
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "streaming_memory.json")
    return parser.parse_args()


def synthetic_images(start: int, count: int, size: int) -> np.ndarray:
    """Images `start` .. `start + count`: a few random low-frequency waves per channel plus noise, so that
    JPEG compresses them about as it does photographs (neither flat nor pure noise)."""
    rng = np.random.default_rng(start)
    grid = np.linspace(0, 2 * np.pi, size, dtype=np.float32)
    frequency = rng.uniform(0.5, 3, (count, 3, 2)).astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, (count, 3, 2)).astype(np.float32)
    rows = np.sin(frequency[..., 0, None] * grid + phase[..., 0, None])  # count x 3 x size
    cols = np.sin(frequency[..., 1, None] * grid + phase[..., 1, None])
    waves = rows[..., :, None] * cols[..., None, :]  # count x 3 x size x size
    noise = rng.normal(0, 0.08, waves.shape).astype(np.float32)
    return np.clip((waves + noise + 1) * 127.5, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


class PeakMemory:
    """Peak RSS of this process and, by role, of the processes below it (its local Ray instance), sampled."""

    def __init__(self, every: float = 0.2):
        self.every = every
        self.peaks = {"driver": 0, "train worker": 0, "largest other Ray worker": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            sizes = {"driver": me.memory_info().rss, "train worker": 0, "largest other Ray worker": 0}
            for process in me.children(recursive=True):
                try:
                    command = " ".join(process.cmdline())
                    rss = process.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                if "RayTrainWorker" in command:
                    sizes["train worker"] = max(sizes["train worker"], rss)
                elif command.startswith("ray::"):  # Ray Data's tasks, Ray Train's controller, idle workers
                    sizes["largest other Ray worker"] = max(sizes["largest other Ray worker"], rss)
            for role, size in sizes.items():
                self.peaks[role] = max(self.peaks[role], size)
            self._stop.wait(self.every)


def write_shards(folder: Path, count: int, size: int) -> ShardWriter:
    writer = ShardWriter(str(folder), images_per_shard=8192)
    for start in range(0, count, CHUNK):  # in chunks: the streamed side never holds the whole set
        for image in synthetic_images(start, min(CHUNK, count - start), size):
            writer.add(image)
    writer.close()
    return writer


def main() -> None:
    args = parse_args()
    from selfsup.train.ray_trainer import connect_ray, pretrain_with_ray

    connect_ray(streaming=True)  # a local Ray instance below this process, with what the streamed runs need

    params = load_params(
        {
            "model": {"width": args.width},
            "train": {"epochs": 1, "batch_size": args.batch_size, "warmup_epochs": 0, "monitor_every": 0},
            "scaling": {"max_failures": 0},
        }
    )
    spec = PretrainSpec(params.model, params.method, params.views, params.train, [0.5] * 3, [0.25] * 3, args.image_size)
    results = []
    for count in args.sizes:
        folder = Path(tempfile.mkdtemp(prefix="streaming-memory-"))
        for path in args.paths:
            started = time.perf_counter()
            if path == "streamed":
                writer = write_shards(folder / "shards", count, args.image_size)
                data = Shards(str(folder / "shards"), writer.files, count)
            else:
                data = np.concatenate(
                    [synthetic_images(s, min(CHUNK, count - s), args.image_size) for s in range(0, count, CHUNK)]
                )
            prepared_s = time.perf_counter() - started
            with PeakMemory() as memory:
                started = time.perf_counter()
                state = pretrain_with_ray(data, spec, params.scaling, folder / "runs", path.replace(" ", "-"))
                train_s = time.perf_counter() - started
            del data
            row = {
                "images": count,
                "path": path,
                "decoded_mib": round(count * args.image_size**2 * 3 / MIB),
                **{f"{role} peak MiB": round(peak / MIB) for role, peak in memory.peaks.items()},
                "images_per_s": round(state["history"][-1]["images_per_s"]),
                "prepare_s": round(prepared_s, 1),
                "train_s": round(train_s, 1),
            }
            results.append(row)
            print(json.dumps(row), flush=True)
        shutil.rmtree(folder, ignore_errors=True)
    roles = list(PeakMemory().peaks)
    print(
        f"\n{args.image_size} px, small CNN x{args.width}, SimCLR, batch {args.batch_size}, one epoch, peak RSS in MiB"
    )
    print("| images | decoded | path | " + " | ".join(roles) + " |")
    print("|---:|---:|---|" + "---:|" * len(roles))
    for row in results:
        peaks = " | ".join(f"{row[f'{role} peak MiB']:,}" for role in roles)
        print(f"| {row['images']:,} | {row['decoded_mib']:,} | {row['path']} | {peaks} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": results}, indent=2))


if __name__ == "__main__":
    main()
