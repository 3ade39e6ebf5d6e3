"""Similarity search over the embeddings `pipelines.embed` wrote, by cosine similarity, with faiss.

Up to EXACT_UP_TO vectors the index is exact (`IndexFlatIP` on unit vectors: a matrix product, BLAS); beyond, an
HNSW graph (`IndexHNSWFlat`), whose search breadth is set for recall@10 well above 0.95 (benchmarks/index_search.py
measures it, and faiss against usearch: faiss answered 1.4-2.3x the queries/s at equal recall, docs/consuming.md).
An index remembers the model version whose embeddings it holds, and refuses queries embedded by another: the two
spaces have nothing in common, and a mix would answer with confident nonsense.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from selfsup.errors import SelfsupError
from selfsup.tracking import ModelVersionRef

# Measured on 2 cores (docs/consuming.md): exact search answers 12,000 queries/s over 50,000 x 128 and 2,200 over
# 200,000 x 256, batched; past 100,000 images the graph answers ~6x faster at recall@10 0.999.
EXACT_UP_TO = 100_000
HNSW_NEIGHBOURS = 32  # faiss's M: 64 links a node at the base layer
HNSW_BUILD_BREADTH = 128  # efConstruction
# efSearch: at M = 16 and 64 recall@10 was 0.999 on CIFAR-10's embeddings and on 200,000 clustered vectors, but 0.94
# on tests/unit/test_search.py's denser clusters; M = 32 and 128 hold 0.95 there too.
HNSW_SEARCH_BREADTH = 128
INDEX_FILE, PATHS_FILE, META_FILE = "index.faiss", "paths.json", "index.json"


class SearchIndexError(SelfsupError):
    """An index that is missing, unreadable, or asked about embeddings of another model version."""


@dataclass(frozen=True)
class IndexMeta:
    model: str
    version: str
    kind: str  # "exact" or "hnsw"
    count: int
    dim: int
    embeddings: str  # the folder of shards it was built from

    @property
    def model_ref(self) -> ModelVersionRef:
        return ModelVersionRef(self.model, self.version)


class EmbeddingIndex:
    """Unit vectors of a collection's images, searchable by cosine similarity; row i is `paths[i]`."""

    def __init__(self, meta: IndexMeta, paths: list[str], index):
        self.meta, self.paths, self.index = meta, paths, index

    @classmethod
    def build(cls, embeddings: Path, exact_up_to: int = EXACT_UP_TO) -> EmbeddingIndex:
        """Every embedding of the shards under `embeddings` (what `pipelines.embed` wrote)."""
        import faiss

        model, paths, vectors = read_embeddings(embeddings)
        dim = vectors.shape[1]
        if len(vectors) <= exact_up_to:
            index, kind = faiss.IndexFlatIP(dim), "exact"
        else:
            index, kind = faiss.IndexHNSWFlat(dim, HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT), "hnsw"
            index.hnsw.efConstruction = HNSW_BUILD_BREADTH
            index.hnsw.efSearch = HNSW_SEARCH_BREADTH
        index.add(unit(vectors))
        meta = IndexMeta(model.name, model.version, kind, len(paths), dim, str(Path(embeddings).resolve()))
        return cls(meta, paths, index)

    def save(self, folder: Path) -> None:
        import faiss

        folder.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(folder / INDEX_FILE))
        (folder / PATHS_FILE).write_text(json.dumps(self.paths))
        (folder / META_FILE).write_text(json.dumps(asdict(self.meta), indent=2) + "\n")  # last: marks it whole

    @classmethod
    def load(cls, folder: Path) -> EmbeddingIndex:
        import faiss

        if not (folder / META_FILE).is_file():
            raise SearchIndexError(f"no index at {folder}: build one with `python -m pipelines.search build`")
        try:
            meta = IndexMeta(**json.loads((folder / META_FILE).read_text()))
            paths = json.loads((folder / PATHS_FILE).read_text())
            index = faiss.read_index(str(folder / INDEX_FILE))
        except (OSError, ValueError, TypeError, RuntimeError) as error:
            raise SearchIndexError(f"cannot read the index at {folder} ({error}): build it again") from None
        if index.ntotal != meta.count or len(paths) != meta.count:
            raise SearchIndexError(f"the index at {folder} is incomplete: build it again")
        if meta.kind == "hnsw":
            index.hnsw.efSearch = HNSW_SEARCH_BREADTH
        return cls(meta, paths, index)

    def search(self, queries: np.ndarray, k: int, embedded_by: ModelVersionRef) -> tuple[np.ndarray, np.ndarray]:
        """(cosine similarities, row indices), each N x k, best first, of the k nearest images of each query;
        rows of -1 where the index holds fewer than k."""
        self.check_model(embedded_by)
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if queries.shape[1] != self.meta.dim:
            raise SearchIndexError(f"queries have {queries.shape[1]} dimensions; the index holds {self.meta.dim}")
        return self.index.search(unit(queries), min(k, self.meta.count))

    def check_model(self, embedded_by: ModelVersionRef) -> None:
        if embedded_by != self.meta.model_ref:
            raise SearchIndexError(
                f"the index holds embeddings of {self.meta.model} version {self.meta.version}, the queries come from "
                f"{embedded_by.name} version {embedded_by.version}: embed the collection again with that version "
                "and rebuild the index, or query with the index's version"
            )

    def near_duplicates(self, threshold: float, per_image: int = 16) -> list[tuple[int, int, float]]:
        """Pairs (i, j, cosine), i < j, at least `threshold` alike, most alike first: each image's `per_image`
        nearest are compared (exact with the exact index, approximate beyond)."""
        vectors = self.index.reconstruct_n(0, self.meta.count)
        scores, rows = self.index.search(vectors, min(per_image + 1, self.meta.count))
        pairs = {}
        for i, (row_scores, row) in enumerate(zip(scores, rows)):
            for score, j in zip(row_scores, row):
                if j >= 0 and j != i and score >= threshold:
                    pairs[(min(i, j), max(i, j))] = float(score)
        return sorted(((i, j, s) for (i, j), s in pairs.items()), key=lambda pair: -pair[2])


def unit(vectors: np.ndarray) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def read_embeddings(folder: Path) -> tuple[ModelVersionRef, list[str], np.ndarray]:
    """The shards `pipelines.embed` wrote under `folder`: the model version, the paths, the N x D embeddings."""
    import pyarrow.parquet as pq

    from selfsup.embedding import MANIFEST

    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        raise SearchIndexError(f"no embeddings at {folder}: write them with `python -m pipelines.embed --out {folder}`")
    manifest = json.loads((folder / MANIFEST).read_text())
    missing = [name for name in manifest["files"] if not (folder / name).is_file()]
    if missing:
        raise SearchIndexError(
            f"{len(missing)} of the {len(manifest['files'])} shards under {folder} are missing (first: {missing[0]}): "
            "run `python -m pipelines.embed` again to complete them"
        )
    paths, parts = [], []
    for name in manifest["files"]:
        table = pq.read_table(folder / name, columns=["path", "embedding"])
        paths += table.column("path").to_pylist()
        column = table.column("embedding").combine_chunks()
        parts.append(column.flatten().to_numpy().reshape(len(column), -1))
    if not paths:
        raise SearchIndexError(f"the shards under {folder} hold no embeddings (every image was unreadable)")
    return ModelVersionRef(manifest["model"], manifest["version"]), paths, np.concatenate(parts)
