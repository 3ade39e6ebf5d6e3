"""The evaluation pictures: valid PNGs, no leaked figures, deterministic, and the pure helpers exact."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.image as mpimg  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402

from selfsup.eval.pictures import (  # noqa: E402
    OTHER_CLASS,
    SAME_CLASS,
    _retrieval_figure,
    embedding_2d,
    nearest_neighbours,
    plot_confusion_matrix,
    plot_embedding_map,
    plot_label_fraction,
    plot_retrieval_grid,
    plot_sweep,
    plot_training_curves,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path, returned: Path) -> np.ndarray:
    """`path` was written, is a PNG matplotlib reads back, of sane size, and no figure stayed open."""
    assert returned == path and path.is_file()
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert path.stat().st_size < 500_000  # small figures: tens of KB, not megabytes
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    assert 50 <= image.shape[0] <= 2000 and 50 <= image.shape[1] <= 2000
    assert image.std() > 0  # something was drawn
    assert plt.get_fignums() == []
    return image


def clusters(n_per_class: int = 30, classes: int = 3, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Well-separated Gaussian clusters along orthogonal directions (separated in cosine too)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), n_per_class)
    centres = 10.0 * np.eye(dim)[:classes]
    return centres[labels] + rng.normal(size=(len(labels), dim)), labels


def history(monitor_every: int | None) -> list[dict]:
    rows = []
    for epoch in range(10):
        row = {"epoch": epoch, "loss": 5.0 / (epoch + 1), "lr": 0.1 * (1 - epoch / 10)}
        if monitor_every is not None and epoch % monitor_every == 0:
            row["monitor_knn_top1"] = 0.2 + 0.05 * epoch
        elif monitor_every is not None and epoch == 1:
            row["monitor_knn_top1"] = None  # an explicit None reads as "not measured"
        rows.append(row)
    return rows


@pytest.mark.parametrize("monitor_every", [3, None], ids=["monitor-some-epochs", "monitor-off"])
def test_training_curves(tmp_path: Path, monitor_every: int | None) -> None:
    path = tmp_path / "nested" / "dir" / "curves.png"  # parent folders are created
    assert_png(path, plot_training_curves(history(monitor_every), path))


def test_training_curves_rejects_incomplete_history(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="lr"):
        plot_training_curves([{"epoch": 0, "loss": 1.0}], tmp_path / "c.png")
    with pytest.raises(ValueError, match="empty"):
        plot_training_curves([], tmp_path / "c.png")
    assert plt.get_fignums() == []


LABEL_ROWS = [
    {"fraction": f, "pretrained_mean": p, "pretrained_std": 0.01, "baseline_mean": b, "baseline_std": 0.02}
    for f, p, b in [(0.01, 0.6, 0.3), (0.1, 0.8, 0.6), (1.0, 0.9, 0.85)]
]


def test_label_fraction(tmp_path: Path) -> None:
    path = tmp_path / "label_fraction.png"
    assert_png(path, plot_label_fraction(LABEL_ROWS, path))


def test_label_fraction_rejects_missing_key(tmp_path: Path) -> None:
    rows = [dict(row) for row in LABEL_ROWS]
    del rows[1]["baseline_std"]
    with pytest.raises(ValueError, match=r"rows\[1\].*baseline_std"):
        plot_label_fraction(rows, tmp_path / "lf.png")
    assert not (tmp_path / "lf.png").exists()
    assert plt.get_fignums() == []


@pytest.mark.parametrize("classes", [4, 25], ids=["annotated", "many-classes"])
def test_confusion_matrix(tmp_path: Path, classes: int) -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, classes, 300)
    predictions = np.where(rng.random(300) < 0.7, labels, rng.integers(0, classes, 300))
    names = [f"class {c}" for c in range(classes)]
    path = tmp_path / "confusion.png"
    assert_png(path, plot_confusion_matrix(labels, predictions, names, path))


def test_confusion_matrix_rejects_out_of_range_labels(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must lie in"):
        plot_confusion_matrix(np.array([0, 1, 2]), np.array([0, 1, 3]), ["a", "b", "c"], tmp_path / "c.png")


def test_embedding_2d_deterministic_and_separates_clusters() -> None:
    features, labels = clusters()
    first, again = embedding_2d(features, seed=0), embedding_2d(features, seed=0)
    assert first.shape == (len(features), 2)
    np.testing.assert_array_equal(first, again)

    distances = np.linalg.norm(first[:, None] - first[None], axis=-1)
    same = labels[:, None] == labels[None]
    off_diagonal = ~np.eye(len(labels), dtype=bool)
    assert distances[same & off_diagonal].mean() < 0.5 * distances[~same].mean()


def test_embedding_map_deterministic_and_subsamples(tmp_path: Path) -> None:
    features, labels = clusters(n_per_class=40)
    names = ["a", "b", "c"]
    first, second = tmp_path / "a" / "map.png", tmp_path / "b" / "map.png"
    assert_png(first, plot_embedding_map(features, labels, names, first, seed=1, max_points=60))
    assert_png(second, plot_embedding_map(features, labels, names, second, seed=1, max_points=60))
    assert first.read_bytes() == second.read_bytes()  # same seed, same bytes: DVC sees no spurious change


def test_nearest_neighbours_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    train, test = rng.normal(size=(200, 12)), rng.normal(size=(37, 12))
    got = nearest_neighbours(train, test, k=5)

    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    expected = np.argsort(-(unit(test) @ unit(train).T), axis=1)[:, :5]
    assert got.shape == (37, 5)
    np.testing.assert_array_equal(got, expected)


def test_nearest_neighbour_of_a_member_is_itself() -> None:
    train = np.random.default_rng(1).normal(size=(50, 8)).astype(np.float32)
    np.testing.assert_array_equal(nearest_neighbours(train, train, k=1)[:, 0], np.arange(50))
    # scale does not matter to cosine similarity
    np.testing.assert_array_equal(nearest_neighbours(train, 3.0 * train[:10], k=3)[:, 0], np.arange(10))


def test_nearest_neighbours_rejects_bad_k() -> None:
    with pytest.raises(ValueError, match="k="):
        nearest_neighbours(np.ones((3, 2)), np.ones((1, 2)), k=4)


def retrieval_inputs(q: int = 3, k: int = 4, size: int = 16) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(0)
    query_images = rng.integers(0, 256, (q, size, size, 3), dtype=np.uint8)
    neighbour_images = rng.integers(0, 256, (q, k, size, size, 3), dtype=np.uint8)
    query_labels = np.arange(q)
    neighbour_labels = np.where(rng.random((q, k)) < 0.5, query_labels[:, None], (query_labels[:, None] + 1) % q)
    return query_images, query_labels, neighbour_images, neighbour_labels


def test_retrieval_figure_has_one_row_per_query() -> None:
    q, k = 3, 4
    fig = _retrieval_figure(*retrieval_inputs(q, k), class_names=["cat", "dog", "ship"])
    try:
        assert len(fig.axes) == q * (k + 1)
        assert fig.axes[0].get_subplotspec().get_gridspec().get_geometry() == (q, k + 1)
        # frames: the neighbour's spine colour says whether its class matches the query's
        _, query_labels, _, neighbour_labels = retrieval_inputs(q, k)
        for i in range(q):
            for j in range(k):
                edge = fig.axes[i * (k + 1) + j + 1].spines["top"].get_edgecolor()
                expected = SAME_CLASS if neighbour_labels[i, j] == query_labels[i] else OTHER_CLASS
                assert edge == to_rgba(expected)
    finally:
        plt.close(fig)


def test_retrieval_grid(tmp_path: Path) -> None:
    path = tmp_path / "retrieval.png"
    short, tall = tmp_path / "short.png", tmp_path / "tall.png"
    assert_png(path, plot_retrieval_grid(*retrieval_inputs(), path, class_names=["cat", "dog", "ship"]))
    # more queries, taller picture (one row per query); no class names falls back to the label numbers
    height_short = assert_png(short, plot_retrieval_grid(*retrieval_inputs(q=2), short)).shape[0]
    height_tall = assert_png(tall, plot_retrieval_grid(*retrieval_inputs(q=6), tall)).shape[0]
    assert height_tall > 2 * height_short


def test_retrieval_grid_rejects_mismatched_shapes(tmp_path: Path) -> None:
    query_images, query_labels, neighbour_images, neighbour_labels = retrieval_inputs()
    with pytest.raises(ValueError, match="disagree"):
        plot_retrieval_grid(query_images, query_labels, neighbour_images, neighbour_labels[:, :2], tmp_path / "r.png")
    assert plt.get_fignums() == []


def test_sweep_plot_has_a_panel_per_searched_param_and_is_deterministic(tmp_path: Path) -> None:
    values = {"train.lr": [0.05, 0.1, 0.5, 0.9], "method.name": ["simclr", "moco", "simclr", "byol"]}
    scores = [0.9, None, 0.95, 0.7]  # the second trial never reported
    first = plot_sweep(values, scores, "monitor_knn_top1", "max", ["train.lr"], tmp_path / "a.png", [1, 0, 1, 0])
    image = assert_png(tmp_path / "a.png", first)
    assert image.shape[1] > image.shape[0]  # two panels side by side
    second = plot_sweep(values, scores, "monitor_knn_top1", "max", ["train.lr"], tmp_path / "b.png", [1, 0, 1, 0])
    assert first.read_bytes() == second.read_bytes()
    with pytest.raises(ValueError, match="no searched params"):
        plot_sweep({}, [], "loss", "min", [], tmp_path / "c.png")
