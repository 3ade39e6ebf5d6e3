"""Approximate nearest-neighbour search for `pipelines.search`: faiss HNSW against usearch HNSW, by recall@10 against
exact search and queries/s, on the same vectors side by side in one run, with faiss's exact search for reference.

Two sets: embeddings written by `pipelines.embed` (--embeddings, e.g. CIFAR-10 by the champion), and synthetic
clustered vectors (--synthetic N, 256 dimensions around 1,000 centres: many images of few themes, the hard case
for a graph index). Both libraries build graphs of the degree and construction breadth selfsup.search uses
(HNSW_NEIGHBOURS, HNSW_BUILD_BREADTH), and are queried at several search breadths; 1,000 held-out queries, k = 10,
all cores.

    pip install -e ".[usearch]"
    python benchmarks/index_search.py --embeddings embeddings/cifar10-train --synthetic 200000   (~5 min on 2 cores)
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "ssl"))  # a plain checkout works without `pip install`

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from selfsup.search import HNSW_BUILD_BREADTH, HNSW_NEIGHBOURS, read_embeddings, unit  # noqa: E402

K, QUERIES, BREADTHS = 10, 1000, (16, 32, 64, 128)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--embeddings", type=Path, help="a folder pipelines.embed wrote")
    parser.add_argument("--synthetic", type=int, default=200_000, help="clustered vectors (0: none)")
    return parser.parse_args()


def synthetic(count: int, dim: int = 256, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(1000, dim)).astype(np.float32)
    vectors = centres[rng.integers(0, 1000, count)] + 0.7 * rng.normal(size=(count, dim)).astype(np.float32)
    return unit(vectors)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f[f >= 0]) & set(t)) / K for f, t in zip(found, truth)]))


def measure(name: str, base: np.ndarray, queries: np.ndarray) -> list[tuple]:
    import faiss
    from usearch.index import Index

    dim = base.shape[1]
    rows = []
    exact = faiss.IndexFlatIP(dim)
    exact.add(base)
    started = time.perf_counter()
    _, truth = exact.search(queries, K)
    rows.append((name, "faiss exact (IndexFlatIP)", "-", 0.0, 1.0, len(queries) / (time.perf_counter() - started)))

    started = time.perf_counter()
    hnsw = faiss.IndexHNSWFlat(dim, HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)  # selfsup's settings
    hnsw.hnsw.efConstruction = HNSW_BUILD_BREADTH
    hnsw.add(base)
    built = time.perf_counter() - started
    for breadth in BREADTHS:
        hnsw.hnsw.efSearch = breadth
        started = time.perf_counter()
        _, found = hnsw.search(queries, K)
        rows.append(
            (name, "faiss HNSW", breadth, built, recall(found, truth), len(queries) / (time.perf_counter() - started))
        )

    started = time.perf_counter()
    graph = Index(ndim=dim, metric="ip", dtype="f32", connectivity=HNSW_NEIGHBOURS, expansion_add=HNSW_BUILD_BREADTH)
    graph.add(np.arange(len(base)), base)
    built = time.perf_counter() - started
    for breadth in BREADTHS:
        graph.expansion_search = breadth
        started = time.perf_counter()
        found = graph.search(queries, K).keys.astype(np.int64)
        rows.append(
            (name, "usearch HNSW", breadth, built, recall(found, truth), len(queries) / (time.perf_counter() - started))
        )
    for row in rows[-2 * len(BREADTHS) - 1 :]:
        print(f"{row[0]}: {row[1]} breadth {row[2]}: build {row[3]:.1f} s, recall@10 {row[4]:.3f}, {row[5]:,.0f} q/s")
    return rows


def main() -> None:
    args = parse_args()
    sets = []
    if args.embeddings:
        _, _, vectors = read_embeddings(args.embeddings)
        sets.append((f"{args.embeddings.name} ({len(vectors):,} x {vectors.shape[1]})", unit(vectors)))
    if args.synthetic:
        sets.append((f"synthetic ({args.synthetic:,} x 256)", synthetic(args.synthetic + QUERIES)))
    rows = []
    rng = np.random.default_rng(1)
    for name, vectors in sets:
        held_out = rng.permutation(len(vectors))
        queries, base = vectors[held_out[:QUERIES]], vectors[held_out[QUERIES:]]
        rows += measure(name, np.ascontiguousarray(base), np.ascontiguousarray(queries))
    print(f"\n{QUERIES:,} queries, k = {K}\n")
    print("| vectors | index | search breadth | build (s) | recall@10 | queries/s |")
    print("|---|---|---:|---:|---:|---:|")
    for name, index, breadth, built, found, rate in rows:
        print(f"| {name} | {index} | {breadth} | {built:.1f} | {found:.3f} | {rate:,.0f} |")


if __name__ == "__main__":
    main()
