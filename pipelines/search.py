"""Search the embeddings `pipelines.embed` wrote: build an index, ask it for an image's nearest images, list the
near-duplicate pairs.

    python -m pipelines.search build --embeddings embeddings/photos --index indexes/photos
    python -m pipelines.search query --index indexes/photos --image query.jpg -k 10
    python -m pipelines.search duplicates --index indexes/photos --threshold 0.95 --out reports/duplicates

`query` embeds the image with the model version the index was built from; `--model` names another (an alias, such
as @champion after it moved), and an index of another version's embeddings refuses it.
"""

import argparse
import csv
from pathlib import Path

from pipelines.common import ROOT, read_params, run_stage


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="index the embeddings under --embeddings")
    build.add_argument("--embeddings", required=True, type=Path)
    build.add_argument("--index", required=True, type=Path)
    query = commands.add_parser("query", help="print the k nearest images of an image")
    query.add_argument("--index", required=True, type=Path)
    query.add_argument("--image", required=True, help="an image file, or a URI pyarrow reads")
    query.add_argument("-k", type=int, default=10)
    query.add_argument("--model", help="models:/NAME@ALIAS or models:/NAME/VERSION (default: the index's version)")
    duplicates = commands.add_parser("duplicates", help="pairs of images at least --threshold alike (cosine)")
    duplicates.add_argument("--index", required=True, type=Path)
    duplicates.add_argument("--threshold", type=float, default=0.95)
    duplicates.add_argument("--out", required=True, type=Path, help="the folder for duplicates.csv and .png")
    duplicates.add_argument("--shown", type=int, default=24, help="pairs in the picture (default 24)")
    args = parser.parse_args()
    if args.command == "query" and args.k < 1:
        parser.error("-k must be at least 1")
    if args.command == "duplicates" and not -1 <= args.threshold <= 1:
        parser.error("--threshold is a cosine similarity: between -1 and 1")
    return args


def main() -> None:
    args = parse_args()
    from selfsup.search import EmbeddingIndex

    if args.command == "build":
        index = EmbeddingIndex.build(args.embeddings)
        index.save(args.index)
        meta = index.meta
        print(f"indexed {meta.count:,} embeddings of {meta.model} version {meta.version} ({meta.kind}) in {args.index}")
    elif args.command == "query":
        _query(args, EmbeddingIndex.load(args.index))
    else:
        _duplicates(args, EmbeddingIndex.load(args.index))


def _query(args: argparse.Namespace, index) -> None:
    import mlflow

    from selfsup.data.sources import read_image
    from selfsup.tracking import resolve_model, resolve_tracking_uri

    tracking_uri = resolve_tracking_uri(read_params().mlflow, ROOT)
    model = resolve_model(args.model, tracking_uri) if args.model else index.meta.model_ref
    index.check_model(model)  # before loading the model or reading the image
    image = read_image(args.image)
    mlflow.set_tracking_uri(tracking_uri)
    embedding = mlflow.pyfunc.load_model(model.uri).predict([image])
    scores, rows = index.search(embedding, args.k, model)
    print(f"the {min(args.k, index.meta.count)} nearest of {args.image} ({model.name} version {model.version}):")
    for rank, (score, row) in enumerate(zip(scores[0], rows[0]), start=1):
        print(f"{rank:3d}  {score:.4f}  {index.paths[row]}")


def _duplicates(args: argparse.Namespace, index) -> None:
    from selfsup.data.sources import read_image
    from selfsup.eval.pictures import plot_image_pairs

    pairs = index.near_duplicates(args.threshold)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "duplicates.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path_a", "path_b", "cosine"])
        writer.writerows((index.paths[i], index.paths[j], f"{score:.6f}") for i, j, score in pairs)
    shown = [(read_image(index.paths[i]), read_image(index.paths[j]), f"{s:.3f}") for i, j, s in pairs[: args.shown]]
    plot_image_pairs(shown, args.out / "duplicates.png")
    print(
        f"{len(pairs):,} pairs of the {index.meta.count:,} images are at least {args.threshold} alike: "
        f"{args.out / 'duplicates.csv'}, the {len(shown)} most alike in {args.out / 'duplicates.png'}"
    )


if __name__ == "__main__":
    run_stage(main)
