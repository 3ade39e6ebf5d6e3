"""A method's training throughput: the model alone, our on-device pipeline, and the usual DataLoader way.

Three figures, in images per second (an image counts once for all its views), all with ResNet-18
(CIFAR stem), the same batch and a fresh model and optimiser each; `--method` picks the method:

  (a) model alone:  `TrainStep.update` on random float views made once: the limit of any pipeline.
  (b) ours:         `TrainStep.__call__`, what `pretrain` runs: the uint8 dataset resident on the
                    device, random batch indices, both views made on the device.
  (c) torchvision:  PIL images through torchvision.transforms in DataLoader workers, two views per
                    image, copied to the device and fed to the same `TrainStep.update` (only for
                    methods that take two views of the image's size).

Each is measured per variant: eager fp32 and compiled fp32 on CPU; eager fp32, eager bf16 and
compiled bf16 (with channels_last) on CUDA. Needs only torch, torchvision, numpy, pydantic, pyyaml and
scikit-learn: no Ray, MLflow or DVC, and no installed package (it imports from ../ssl).

    python benchmarks/throughput.py                      # CIFAR-10 from ../shared, batch 512
    python benchmarks/throughput.py --method byol        # any method in selfsup.methods.METHODS
    python benchmarks/throughput.py --batch-size 16 --steps 2 --warmup 1 --width 0.125 \\
        --workers 1 --threads 1 --max-images 512 --no-compile   # seconds, on a CPU
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "ssl"))  # a plain checkout works without `pip install`

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Callable  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision.transforms as T  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset, RandomSampler  # noqa: E402

from selfsup.config import DataConfig  # noqa: E402
from selfsup.data.arrays import load_split  # noqa: E402
from selfsup.data.sources import prepare_dataset, read_image_folder  # noqa: E402
from selfsup.data.views import view_generator  # noqa: E402
from selfsup.methods import METHODS, TrainingProgress  # noqa: E402
from selfsup.params import Params  # noqa: E402
from selfsup.train.loop import PretrainSpec, single_process_step  # noqa: E402
from selfsup.train.step import TrainStep  # noqa: E402

DEFAULT_IMAGEFOLDER = REPO.parent / "shared" / "datasets" / "cifar10" / "train"
PROGRESS = TrainingProgress(step=0, total_steps=1000, steps_per_epoch=100)  # for the methods' hooks
FIGURES = {"model_alone": "(a) model alone", "ours": "(b) ours", "torchvision": "(c) torchvision"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data", type=Path, help="a prepared folder (manifest.json + train.npz), e.g. data/prepared")
    source.add_argument("--imagefolder", type=Path, help=f"a folder of <class>/*.jpg (default: {DEFAULT_IMAGEFOLDER})")
    source.add_argument("--packed", type=Path, help="JPEGs packed by benchmarks/pack_jpegs.py (to carry to a GPU)")
    parser.add_argument("--max-images", type=int, help="load at most this many (50k JPEGs decode in ~30 s)")
    parser.add_argument("--method", default="simclr", choices=list(METHODS))
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per figure")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="DataLoader workers for (c)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, one per core)")
    parser.add_argument("--width", type=float, default=1.0, help="ResNet-18 channel multiplier")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "throughput.json")
    return parser.parse_args()


def load_images(args: argparse.Namespace) -> tuple[np.ndarray, str]:
    """uint8 N x H x W x 3 training images, and where they came from."""
    if args.data:
        images, origin = load_split(args.data, "train", with_labels=False), str(args.data)
    elif args.packed:
        from pack_jpegs import unpack_images  # beside this script

        images, origin = unpack_images(args.packed), str(args.packed)
    elif args.imagefolder or DEFAULT_IMAGEFOLDER.is_dir():
        folder = args.imagefolder or DEFAULT_IMAGEFOLDER
        images, origin = read_image_folder(folder, limit=args.max_images)[0].images, str(folder)
    else:
        with tempfile.TemporaryDirectory() as folder:
            prepare_dataset(DataConfig(source="digits", image_size=32), folder)
            images, origin = load_split(folder, "train", with_labels=False), "digits (embedded), resized to 32"
    return images[: args.max_images], origin


def make_step(images: np.ndarray, args: argparse.Namespace, precision: str, compiled: bool) -> TrainStep:
    """A fresh model and optimiser, configured the way `pretrain` would configure them."""
    params = Params.model_validate(
        {
            "model": {"backbone": "resnet18", "width": args.width},
            "method": {"name": args.method},
            "train": {"batch_size": args.batch_size, "precision": precision, "compile": compiled},
        }
    )
    sample = images[:: max(1, len(images) // 4096)].reshape(-1, 3) / 255.0  # a sample's statistics will do
    mean, std = sample.mean(0).tolist(), sample.std(0).tolist()
    # 10 classes: what a method that trains on labels (the supervised reference) gets; the others ignore it.
    spec = PretrainSpec(params.model, params.method, params.views, params.train, mean, std, images.shape[1], 10)
    return single_process_step(spec, torch.device(args.device), num_images=len(images))


def images_per_second(train_step: Callable[[], torch.Tensor], args: argparse.Namespace, warmup: int) -> float:
    for _ in range(warmup):
        train_step()
    synchronize(args.device)
    started = time.perf_counter()
    for _ in range(args.steps):
        loss, _ = train_step()
    synchronize(args.device)
    seconds = time.perf_counter() - started
    if not math.isfinite(loss.item()):
        print(f"warning: the loss became {loss.item()} (throughput is still measured)", file=sys.stderr)
    return args.steps * args.batch_size / seconds


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)  # CUDA runs asynchronously: wait for the work before reading clocks


def model_alone(step: TrainStep, images: np.ndarray, args: argparse.Namespace) -> float:
    """(a) Random float views, made once: no data pipeline at all."""
    sides = [spec.size or images.shape[1] for spec in step.views]
    views = [torch.rand(args.batch_size, 3, side, side, device=args.device) for side in sides]
    batch = torch.arange(args.batch_size, device=args.device)
    inputs = method_inputs(step, batch, torch.Generator(args.device).manual_seed(0))
    return images_per_second(lambda: step.update(views, PROGRESS, **inputs), args, args.warmup)


def method_inputs(step: TrainStep, batch: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """What the loop hands the methods that take more than views: random labels of 10 classes to the supervised
    reference (the time is what is measured), the batch's indices to Exemplar-CNN."""
    inputs = {}
    if step.method.uses_labels:
        inputs["labels"] = torch.randint(10, batch.shape, device=batch.device, generator=generator)
    if step.method.uses_indices:
        inputs["indices"] = batch
    return inputs


def ours(step: TrainStep, images: np.ndarray, args: argparse.Namespace) -> float:
    """(b) What `pretrain` runs: uint8 data on the device, random batches, views made there."""
    device = torch.device(args.device)
    data = torch.tensor(images, device=device)
    generator = view_generator(seed=0, epoch=0, rank=0, device=device)

    def train_step() -> torch.Tensor:
        batch = torch.randint(len(data), (args.batch_size,), device=device, generator=generator)
        return step(data[batch], generator, PROGRESS, **method_inputs(step, batch, generator))

    return images_per_second(train_step, args, args.warmup)


class TwoViews(Dataset):
    """CIFAR-style: uint8 arrays in memory -> PIL image -> two torchvision-augmented views."""

    def __init__(self, images: np.ndarray):
        self.images = images
        self.transform = T.Compose(
            [
                T.RandomResizedCrop(images.shape[1], scale=(0.2, 1.0)),
                T.RandomHorizontalFlip(),
                T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
                T.RandomGrayscale(p=0.2),
                T.ToTensor(),
            ]
        )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = Image.fromarray(self.images[index])
        return self.transform(image), self.transform(image)


def torchvision_loader(step: TrainStep, images: np.ndarray, args: argparse.Namespace) -> float:
    """(c) The usual way: augment on the CPU in DataLoader workers, copy each batch to the device."""
    device = torch.device(args.device)
    # Until every worker has delivered its first batch, batches arrive in a burst: warm up past it.
    warmup = max(args.warmup, args.workers)
    loader = DataLoader(
        TwoViews(images),
        batch_size=args.batch_size,
        sampler=RandomSampler(images, replacement=True, num_samples=args.batch_size * (warmup + args.steps)),
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
        drop_last=True,
    )
    batches = iter(loader)

    def train_step() -> torch.Tensor:
        views = next(batches)
        return step.update([v.to(device, non_blocking=True) for v in views], PROGRESS)

    return images_per_second(train_step, args, warmup)


def variants(device: torch.device, no_compile: bool) -> dict[str, tuple[str, bool]]:
    """name -> (train.precision, train.compile). bf16 autocast exists only on CUDA in TrainStep."""
    if device.type == "cuda":
        chosen = {"eager fp32": ("fp32", False), "eager bf16": ("bf16", False), "compiled bf16": ("bf16", True)}
    else:
        chosen = {"eager fp32": ("fp32", False), "compiled fp32": ("fp32", True)}
    return {name: config for name, config in chosen.items() if not (no_compile and config[1])}


def print_table(results: dict, header: str) -> None:
    columns = [*FIGURES.values(), "(b)/(a)", "(b)/(c)"]
    print(f"\n{header}\n")
    print(f"{'variant':<15}" + "".join(f"{c:>17}" for c in columns))
    for name, figures in results.items():
        cells = [f"{figures[key]:,.1f}" if key in figures else "-" for key in FIGURES]
        over_torchvision = figures.get("ours_over_torchvision")
        cells += [f"{figures['ours_over_model_alone']:.2f}", f"{over_torchvision:.2f}" if over_torchvision else "-"]
        print(f"{name:<15}" + "".join(f"{c:>17}" for c in cells))
    print()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    images, origin = load_images(args)
    print(f"{len(images):,} images {images.shape[1]}x{images.shape[2]} from {origin}; device {device}", flush=True)

    results = {}
    for name, (precision, compiled) in variants(device, args.no_compile).items():
        figures = {}
        for key, measure in {"model_alone": model_alone, "ours": ours, "torchvision": torchvision_loader}.items():
            step = make_step(images, args, precision, compiled)  # fresh: no state shared between figures
            if key == "torchvision" and [v.size for v in step.views] != [None, None]:
                continue  # the DataLoader baseline makes two full-size views only
            figures[key] = round(measure(step, images, args), 1)
            print(f"  {name:<14} {FIGURES[key]:<16} {figures[key]:>10,.1f} images/s", flush=True)
        figures["ours_over_model_alone"] = round(figures["ours"] / figures["model_alone"], 3)
        if "torchvision" in figures:
            figures["ours_over_torchvision"] = round(figures["ours"] / figures["torchvision"], 3)
        results[name] = figures

    threads = f" ({torch.get_num_threads()} torch threads)" if device.type == "cpu" else ""
    header = (
        f"{args.method} ResNet-18 (width {args.width}), batch {args.batch_size}, {images.shape[1]}x{images.shape[2]}, "
        f"{device}{threads}, {args.workers} loader workers; images/s over {args.steps} steps after "
        f"{args.warmup} warm-up (1 image = 2 views)"
    )
    print_table(results, header)
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "method": args.method,
        "torch": torch.__version__,
        "data": origin,
        "images": len(images),
        "image_size": list(images.shape[1:3]),
        "batch_size": args.batch_size,
        "width": args.width,
        "steps": args.steps,
        "warmup": args.warmup,
        "workers": args.workers,
        "threads": torch.get_num_threads(),
        "variants": results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
