"""Every method's training step side by side: images per second of what `pretrain` runs, and the ratio to SimCLR.

The same images, backbone (ResNet-18, CIFAR stem), batch and precision for each method; each gets a fresh
model and optimiser and its own views (multi-crop methods make and encode more of them, at the sizes
their knobs set). The figure is throughput.py's (b): uint8 data resident on the device, views made there.
Eager fp32 on CPU; eager bf16 and compiled bf16 (channels_last) on CUDA.

    python benchmarks/method_speed.py                                         # on a GPU: batch 512
    python benchmarks/method_speed.py --batch-size 64 --width 0.5 --steps 5   # on a 2-core CPU, ~5 min
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from throughput import REPO, load_images, make_step, ours

from selfsup.methods import METHODS


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--data", type=Path, help="a prepared folder (manifest.json + train.npz), e.g. data/prepared")
    parser.add_argument("--imagefolder", type=Path, help="a folder of <class>/*.jpg (default: ../shared CIFAR-10)")
    parser.add_argument("--packed", type=Path, help="JPEGs packed by benchmarks/pack_jpegs.py (to carry to a GPU)")
    parser.add_argument("--max-images", type=int, default=10_000, help="load at most this many")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per figure")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--width", type=float, default=1.0, help="ResNet-18 channel multiplier")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["eager", "compiled"],
        choices=["eager", "compiled"],
        help="on CUDA: eager bf16, compiled bf16, or both (compiling 16 methods takes minutes)",
    )
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "method_speed.json")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    images, origin = load_images(args)
    cuda = {"eager": ("eager bf16", ("bf16", False)), "compiled": ("compiled bf16", ("bf16", True))}
    variants = dict(cuda[name] for name in args.variants) if device.type == "cuda" else {}
    variants = variants or {"eager fp32": ("fp32", False)}
    print(f"{len(images):,} images {images.shape[1]}x{images.shape[2]} from {origin}; device {device}", flush=True)
    results: dict[str, dict[str, float]] = {}
    for method in args.methods:
        args.method = method  # what make_step reads
        results[method] = {}
        for variant, (precision, compiled) in variants.items():
            results[method][variant] = round(ours(make_step(images, args, precision, compiled), images, args), 1)
            print(f"  {method:<13} {variant:<14} {results[method][variant]:>10,.1f} images/s", flush=True)

    reference = results.get("simclr")
    print(
        f"\nResNet-18 (width {args.width}), batch {args.batch_size}, {images.shape[1]} px, {device}; "
        f"images/s over {args.steps} steps after {args.warmup} warm-up, and the ratio to SimCLR\n"
    )
    print(f"{'method':<14}" + "".join(f"{variant:>16}{'/ simclr':>10}" for variant in variants))
    for method, figures in results.items():
        cells = [
            f"{figures[v]:>16,.1f}" + (f"{figures[v] / reference[v]:>10.2f}" if reference else f"{'-':>10}")
            for v in variants
        ]
        print(f"{method:<14}" + "".join(cells))
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "data": origin,
        "image_size": list(images.shape[1:3]),
        "batch_size": args.batch_size,
        "width": args.width,
        "steps": args.steps,
        "warmup": args.warmup,
        "images_per_s": results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
