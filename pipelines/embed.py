"""Embed every image of a folder or URI with a registered encoder, through Ray Data, into Parquet shards of (path,
embedding, model, version). A re-run writes only the shards that are missing.

    python -m pipelines.embed --images /data/photos --out embeddings/photos
    python -m pipelines.embed --model models:/selfsup-encoder/3 --images s3://bucket/photos --out embeddings/v3 \\
        --actors 4 --gpus-per-actor 1

The model comes from the project's MLflow store (mlflow.tracking_uri in params.yaml; MLFLOW_TRACKING_URI wins),
by alias or version; the alias is read once, so every shard comes from the one version it named.
"""

import argparse
from pathlib import Path

from pipelines.common import ROOT, read_params, run_stage


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--images", required=True, help="a folder of images (any depth), or a URI: file://, s3://, gs://"
    )
    parser.add_argument("--out", required=True, type=Path, help="the folder the shards go to")
    parser.add_argument(
        "--model", help="models:/NAME@ALIAS or models:/NAME/VERSION (default: mlflow.model_name@champion)"
    )
    parser.add_argument("--batch-size", type=int, default=256, help="images per call of the model (default 256)")
    parser.add_argument("--actors", type=int, default=1, help="model replicas, each loading the model once (default 1)")
    parser.add_argument("--gpus-per-actor", type=float, default=0.0, help="0 runs the model on CPUs (default)")
    parser.add_argument("--cpus-per-actor", type=float, default=1.0)
    parser.add_argument("--images-per-shard", type=int, default=10_000)
    args = parser.parse_args()
    for name in ("batch_size", "actors", "images_per_shard"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.gpus_per_actor < 0 or args.cpus_per_actor <= 0:
        parser.error("--gpus-per-actor must be at least 0 and --cpus-per-actor above 0")
    return args


def main() -> None:
    args = parse_args()
    params = read_params()
    from selfsup.embedding import EmbedJob, embed_collection
    from selfsup.tracking import resolve_tracking_uri

    job = EmbedJob(
        model_uri=args.model or f"models:/{params.mlflow.model_name}@champion",
        images=args.images,
        out=args.out,
        tracking_uri=resolve_tracking_uri(params.mlflow, ROOT),
        batch_size=args.batch_size,
        actors=args.actors,
        gpus_per_actor=args.gpus_per_actor,
        cpus_per_actor=args.cpus_per_actor,
        images_per_shard=args.images_per_shard,
        max_image_pixels=params.data.max_image_pixels,
    )
    report = embed_collection(job)
    listed = args.out / "skipped.csv"
    skipped = f", {report.skipped:,} unreadable skipped (listed in {listed})" if report.skipped else ""
    print(
        f"{report.embedded:,} of {report.images:,} images embedded by {report.model} version {report.version} "
        f"({report.dim} dimensions) in {report.shards} shards under {args.out}; {report.shards_written} written now"
        + (f" at {report.images_per_s:,.0f} images/s" if report.shards_written else "")
        + skipped
    )


if __name__ == "__main__":
    run_stage(main)
