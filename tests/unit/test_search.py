"""Similarity search over embedding shards (selfsup.search): exact at small sizes, HNSW beyond with recall@10 of at
least 0.95 against exact search, refusal of another model version's queries, near-duplicate pairs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from selfsup.embedding import _claim_output, _write_shard
from selfsup.search import EmbeddingIndex, SearchIndexError, unit
from selfsup.tracking import ModelVersionRef

MODEL = ModelVersionRef("encoder", "3")


def write_embeddings(out: Path, vectors: np.ndarray, per_shard: int = 500, model: ModelVersionRef = MODEL) -> list:
    """Shards as `pipelines.embed` writes them, of the given vectors; returns the paths."""
    paths = [f"/photos/{i:06d}.jpg" for i in range(len(vectors))]
    shards = -(-len(vectors) // per_shard)
    manifest = {
        "model": model.name,
        "version": model.version,
        "listing_sha256": "x",
        "count": len(paths),
        "images_per_shard": per_shard,
        "files": [f"embeddings-{k:05d}.parquet" for k in range(shards)],
    }
    _claim_output(out, manifest)
    for k in range(shards):
        rows = [(i, vectors[i], "") for i in range(k * per_shard, min((k + 1) * per_shard, len(vectors)))]
        _write_shard(out, k, paths, rows, model)
    return paths


def clustered(count: int, dim: int = 64, seed: int = 0) -> np.ndarray:
    """Vectors around 100 centres, as embeddings of a collection with themes are."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(100, dim))
    return (centres[rng.integers(0, 100, count)] + 0.6 * rng.normal(size=(count, dim))).astype(np.float32)


def test_an_exact_index_answers_what_a_matrix_product_does_and_survives_a_save(tmp_path) -> None:
    vectors = clustered(1200)
    paths = write_embeddings(tmp_path / "embeddings", vectors)
    index = EmbeddingIndex.build(tmp_path / "embeddings")
    assert index.meta.kind == "exact" and index.meta.count == 1200 and index.paths == paths
    index.save(tmp_path / "index")
    loaded = EmbeddingIndex.load(tmp_path / "index")
    queries = clustered(20, seed=1)
    scores, rows = loaded.search(queries, 5, MODEL)
    truth = unit(queries) @ unit(vectors).T
    np.testing.assert_array_equal(rows, np.argsort(-truth, axis=1)[:, :5])
    np.testing.assert_allclose(scores, np.sort(truth, axis=1)[:, ::-1][:, :5], rtol=1e-5, atol=1e-5)


def test_the_approximate_index_finds_at_least_95_percent_of_the_true_ten_nearest(tmp_path) -> None:
    vectors = clustered(6000)
    write_embeddings(tmp_path / "embeddings", vectors, per_shard=2000)
    index = EmbeddingIndex.build(tmp_path / "embeddings", exact_up_to=1000)
    assert index.meta.kind == "hnsw"
    index.save(tmp_path / "index")
    queries = clustered(300, seed=2)
    _, found = EmbeddingIndex.load(tmp_path / "index").search(queries, 10, MODEL)
    truth = np.argsort(-(unit(queries) @ unit(vectors).T), axis=1)[:, :10]
    recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)])
    assert recall >= 0.95, recall


def test_queries_embedded_by_another_version_are_refused_in_one_line(tmp_path) -> None:
    write_embeddings(tmp_path / "embeddings", clustered(50))
    index = EmbeddingIndex.build(tmp_path / "embeddings")
    with pytest.raises(
        SearchIndexError,
        match="holds embeddings of encoder version 3, the queries come from encoder "
        "version 4: embed the collection again",
    ) as refused:
        index.search(clustered(1), 5, ModelVersionRef("encoder", "4"))
    assert "\n" not in str(refused.value)
    with pytest.raises(SearchIndexError, match="queries have 32 dimensions; the index holds 64"):
        index.search(np.zeros((1, 32)), 5, MODEL)


def test_near_duplicates_are_the_planted_pairs_most_alike_first(tmp_path) -> None:
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(300, 64)).astype(np.float32)  # random directions: cosines near 0
    vectors[10] = vectors[200] + 0.01 * rng.normal(size=64)
    vectors[50] = vectors[51] + 0.2 * rng.normal(size=64)
    write_embeddings(tmp_path / "embeddings", vectors)
    pairs = EmbeddingIndex.build(tmp_path / "embeddings").near_duplicates(threshold=0.9)
    assert [(i, j) for i, j, _ in pairs] == [(10, 200), (50, 51)]
    assert pairs[0][2] > pairs[1][2] >= 0.9


def test_missing_or_incomplete_inputs_are_one_line(tmp_path) -> None:
    with pytest.raises(SearchIndexError, match="no embeddings at .*: write them with `python -m pipelines.embed"):
        EmbeddingIndex.build(tmp_path / "nothing")
    write_embeddings(tmp_path / "embeddings", clustered(1200))
    (tmp_path / "embeddings" / "embeddings-00001.parquet").unlink()  # an interrupted embedding
    with pytest.raises(
        SearchIndexError, match="1 of the 3 shards under .* are missing .*run `python -m pipelines.embed"
    ):
        EmbeddingIndex.build(tmp_path / "embeddings")
    with pytest.raises(SearchIndexError, match="no index at .*: build one with `python -m pipelines.search build`"):
        EmbeddingIndex.load(tmp_path / "index")
    write_embeddings(tmp_path / "other", clustered(10))
    EmbeddingIndex.build(tmp_path / "other").save(tmp_path / "index")
    (tmp_path / "index" / "index.faiss").write_bytes(b"truncated")
    with pytest.raises(SearchIndexError, match="cannot read the index at .*: build it again"):
        EmbeddingIndex.load(tmp_path / "index")
