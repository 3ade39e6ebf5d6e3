"""Serve the registered encoder over HTTP with Ray Serve, on 127.0.0.1 unless told otherwise, until Ctrl-C.

python -m pipelines.serve                                       # the champion, followed as it moves
python -m pipelines.serve --index indexes/photos --replicas 2 --port 8000

curl -s --data-binary @photo.jpg http://127.0.0.1:8000/embed            # {"model", "version", "embedding"}
curl -s --data-binary @photo.jpg "http://127.0.0.1:8000/neighbours?k=5" # {"model", "version", "neighbours"}
curl -s http://127.0.0.1:8000/health
"""

import argparse
import os
import threading

from pipelines.common import ROOT, read_params, run_stage


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", help="models:/NAME@ALIAS (followed when it moves) or models:/NAME/VERSION (default: the champion)"
    )
    parser.add_argument("--index", help="a folder `pipelines.search build` wrote: enables /neighbours")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--cpus-per-replica", type=float, default=1.0)
    parser.add_argument("--max-batch-size", type=int, default=32, help="requests embedded together (default 32)")
    parser.add_argument("--poll-s", type=float, default=1.0, help="how often the alias is read (default 1 s)")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to listen on every interface")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    if args.replicas < 1 or args.max_batch_size < 1 or args.poll_s <= 0 or args.cpus_per_replica <= 0:
        parser.error("--replicas and --max-batch-size must be at least 1, --poll-s and --cpus-per-replica above 0")
    return args


def main() -> None:
    args = parse_args()
    params = read_params()
    from pathlib import Path

    from selfsup.search import EmbeddingIndex
    from selfsup.service import ServiceConfig
    from selfsup.tracking import resolve_model, resolve_tracking_uri

    tracking_uri = resolve_tracking_uri(params.mlflow, ROOT)
    config = ServiceConfig(
        model_uri=args.model or f"models:/{params.mlflow.model_name}@champion",
        tracking_uri=tracking_uri,
        index=str(Path(args.index).resolve()) if args.index else None,
        replicas=args.replicas,
        cpus_per_replica=args.cpus_per_replica,
        max_batch_size=args.max_batch_size,
        poll_s=args.poll_s,
        max_image_pixels=params.data.max_image_pixels,
    )
    model = resolve_model(config.model_uri, tracking_uri)  # a missing model or alias: one line, before Ray starts
    if args.index:
        index = EmbeddingIndex.load(Path(args.index))
        if index.meta.model_ref != model:
            print(
                f"warning: the index holds embeddings of version {index.meta.version}, the service starts with "
                f"version {model.version}: /neighbours answers 409 until the index is rebuilt"
            )
    from selfsup.ray_cluster import connect_ray
    from selfsup.service import start

    connect_ray()
    url = start(config, args.host, args.port)
    follows = f", following {config.model_uri}" if "@" in config.model_uri else ""
    print(f"serving {model.name} version {model.version}{follows} at {url} (POST /embed, /neighbours); Ctrl-C stops")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        if os.environ.get("RAY_ADDRESS"):  # Serve outlives this process on a cluster: stop it there
            from ray import serve

            serve.shutdown()
        # A private instance ends with this process, the application with it (serve.shutdown would first wait for
        # the replicas to drain: up to a minute, measured).


if __name__ == "__main__":
    run_stage(main)
