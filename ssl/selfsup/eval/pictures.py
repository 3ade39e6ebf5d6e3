"""PNG pictures of the evaluation stages: DVC declares them as plots, MLflow stores them as artifacts.

Every `plot_*` function writes one small PNG (dpi 100, a few inches: tens of KB) to `path`, creating its parent
folders, closes its figure so long-running stages leak nothing, and returns the path. The Agg backend keeps them
headless, and the same inputs and seed give the same bytes, so DVC sees no change where nothing changed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

DPI = 100
MAX_ANNOTATED_CLASSES = 20  # above this, per-cell counts, tick labels and legends become unreadable
SAME_CLASS, OTHER_CLASS, QUERY_FRAME = "#2ca02c", "#d62728", "#333333"
LABEL_FRACTION_KEYS = ("fraction", "pretrained_mean", "pretrained_std", "baseline_mean", "baseline_std")


def _pyplot():
    """pyplot on the Agg backend: stages run on headless machines and Ray workers, with no display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Figure, path: str | Path) -> Path:
    """Write `fig` as PNG and close it; no Software metadata, so a matplotlib upgrade alone changes no bytes."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png", dpi=DPI, metadata={"Software": None})
    finally:
        _pyplot().close(fig)
    return path


def _class_colours(num_classes: int) -> np.ndarray:
    """Qualitative colours (tab10, then tab20) while classes can be told apart; a continuous map beyond."""
    plt = _pyplot()
    if num_classes <= 10:
        return np.asarray(plt.get_cmap("tab10").colors)[:num_classes]
    if num_classes <= 20:
        return np.asarray(plt.get_cmap("tab20").colors)[:num_classes]
    return plt.get_cmap("turbo")(np.linspace(0.0, 1.0, num_classes))


def plot_note(text: str, path: str | Path) -> Path:
    """A picture that says why there is no picture (an evaluation skipped for want of labels): DVC declares the
    stage's pictures, so they exist either way."""
    plt = _pyplot()
    fig = plt.figure(figsize=(6, 1.2))
    fig.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=9)
    return _save(fig, path)


def plot_training_curves(history: list[dict], path: str | Path) -> Path:
    """Loss, learning rate and the kNN monitor per epoch, side by side: the first look at whether a run trained.

    The monitor only runs every few epochs (or never), so its panel plots just the epochs that have a value.
    """
    if not history:
        raise ValueError("plot_training_curves: history is empty")
    for i, row in enumerate(history):
        missing = [key for key in ("epoch", "loss", "lr") if key not in row]
        if missing:
            raise ValueError(f"plot_training_curves: history[{i}] lacks {missing}")
    epochs = [row["epoch"] for row in history]
    monitored = [
        (row["epoch"], 100.0 * row["monitor_knn_top1"]) for row in history if row.get("monitor_knn_top1") is not None
    ]

    fig, (loss_ax, lr_ax, knn_ax) = _pyplot().subplots(1, 3, figsize=(10, 3), layout="constrained")
    loss_ax.plot(epochs, [row["loss"] for row in history])
    loss_ax.set(title="training loss", xlabel="epoch", ylabel="loss")
    lr_ax.plot(epochs, [row["lr"] for row in history])
    lr_ax.set(title="learning rate", xlabel="epoch", ylabel="lr")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    knn_ax.set(title="monitor kNN top-1", xlabel="epoch", ylabel="top-1 (%)")
    if monitored:
        knn_ax.plot(*zip(*monitored), marker="o")
    else:
        knn_ax.text(0.5, 0.5, "monitor off", transform=knn_ax.transAxes, ha="center", va="center", color="gray")
        knn_ax.set(xticks=[], yticks=[])
    for ax in (loss_ax, lr_ax, knn_ax):
        ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_label_fraction(rows: list[dict], path: str | Path) -> Path:
    """Accuracy against the fraction of labels used, pretrained-then-fine-tuned vs from scratch: the semi-supervised
    result of SSL papers, where pretraining matters most at 1% of labels."""
    if not rows:
        raise ValueError("plot_label_fraction: rows is empty")
    for i, row in enumerate(rows):
        missing = [key for key in LABEL_FRACTION_KEYS if key not in row]
        if missing:
            raise ValueError(
                f"plot_label_fraction: rows[{i}] lacks {missing}; each row needs {list(LABEL_FRACTION_KEYS)}"
            )
    rows = sorted(rows, key=lambda row: row["fraction"])
    percent = np.array([100.0 * row["fraction"] for row in rows])

    fig, ax = _pyplot().subplots(figsize=(5, 3.5), layout="constrained")
    for prefix, label in (("pretrained", "pretrained, fine-tuned"), ("baseline", "from scratch")):
        mean = np.array([100.0 * row[f"{prefix}_mean"] for row in rows])
        std = np.array([100.0 * row[f"{prefix}_std"] for row in rows])
        ax.errorbar(percent, mean, yerr=std, marker="o", capsize=3, label=label)
    ax.set_xscale("log")
    ax.set_xticks(percent, [f"{p:g}%" for p in percent])  # ticks at the fractions run: "1%", "10%", "100%"
    ax.minorticks_off()
    ax.set(xlabel="labelled training data", ylabel="test top-1 (%)", title="label efficiency")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_confusion_matrix(
    labels: np.ndarray,
    predictions: np.ndarray,
    class_names: list[str],
    path: str | Path,
    title: str = "linear probe",
) -> Path:
    """Row-normalised confusion matrix: which classes the representation confuses, beyond a single accuracy.

    Rows are normalised so that rare classes read as clearly as common ones; the cells show raw counts.
    """
    labels, predictions = np.asarray(labels).astype(np.int64), np.asarray(predictions).astype(np.int64)
    n = len(class_names)
    if labels.shape != predictions.shape or labels.ndim != 1:
        raise ValueError(f"plot_confusion_matrix: labels {labels.shape} and predictions {predictions.shape} differ")
    if labels.size and (min(labels.min(), predictions.min()) < 0 or max(labels.max(), predictions.max()) >= n):
        raise ValueError(f"plot_confusion_matrix: labels and predictions must lie in [0, {n})")
    counts = np.bincount(labels * n + predictions, minlength=n * n).reshape(n, n)
    totals = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, totals, out=np.zeros((n, n)), where=totals > 0)
    accuracy = float(np.trace(counts) / max(counts.sum(), 1))

    side = 3.0 + 0.35 * min(n, MAX_ANNOTATED_CLASSES)
    fig, ax = _pyplot().subplots(figsize=(side + 1.0, side), layout="constrained")
    image = ax.imshow(normalised, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of true class")
    if n <= MAX_ANNOTATED_CLASSES:
        ax.set_xticks(range(n), class_names, rotation=45, ha="right", rotation_mode="anchor")
        ax.set_yticks(range(n), class_names)
        for i, j in np.ndindex(n, n):
            colour = "white" if normalised[i, j] > 0.5 else "black"
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7, color=colour)
    ax.set(xlabel="predicted", ylabel="true", title=f"{title} (top-1 {100 * accuracy:.1f}%)")
    return _save(fig, path)


def embedding_2d(features: np.ndarray, seed: int = 0) -> np.ndarray:
    """N x 2 t-SNE of the L2-normalised features: the cosine geometry the kNN and the SSL losses work in.

    PCA initialisation and a fixed random_state make it deterministic, and keep the global layout stable.
    """
    from sklearn.manifold import TSNE

    features = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    n = len(features)
    if n < 4:
        raise ValueError(f"embedding_2d: t-SNE needs at least 4 points, got {n}")
    normalised = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    tsne = TSNE(n_components=2, init="pca", random_state=seed, perplexity=min(30.0, (n - 1) / 3))
    return tsne.fit_transform(normalised)


def plot_embedding_map(
    features: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    path: str | Path,
    seed: int = 0,
    max_points: int = 2000,
) -> Path:
    """t-SNE map of the features coloured by class: whether classes form clusters the encoder was never told about.

    t-SNE is quadratic-ish and a dense map unreadable, so beyond `max_points` a seeded random subset is drawn.
    """
    features, labels = np.asarray(features), np.asarray(labels).astype(np.int64)
    if len(features) != len(labels):
        raise ValueError(f"plot_embedding_map: {len(features)} features but {len(labels)} labels")
    if len(features) > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(len(features), max_points, replace=False))
        features, labels = features[keep], labels[keep]
    points = embedding_2d(features, seed)
    colours = _class_colours(len(class_names))

    fig, ax = _pyplot().subplots(figsize=(6, 5), layout="constrained")
    for c, name in enumerate(class_names):
        mask = labels == c
        if mask.any():
            ax.scatter(points[mask, 0], points[mask, 1], s=6, color=colours[c], label=name, linewidths=0)
    if len(class_names) <= MAX_ANNOTATED_CLASSES:
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, markerscale=2, frameon=False)
    ax.set(xticks=[], yticks=[], title=f"t-SNE of features ({len(points)} points)")
    return _save(fig, path)


def nearest_neighbours(train_features: np.ndarray, test_features: np.ndarray, k: int) -> np.ndarray:
    """Indices (Q x k) of each test feature's k most cosine-similar training features, nearest first.

    The same similarity as the kNN classifier, so the retrieval grid shows the neighbours that actually voted.
    Computed in float64 chunks: exact, and memory stays bounded for large training sets.
    """
    train = np.asarray(train_features, dtype=np.float64).reshape(len(train_features), -1)
    test = np.asarray(test_features, dtype=np.float64).reshape(len(test_features), -1)
    if not 1 <= k <= len(train):
        raise ValueError(f"nearest_neighbours: k={k} must lie in [1, {len(train)}]")
    train = train / np.maximum(np.linalg.norm(train, axis=1, keepdims=True), 1e-12)
    test = test / np.maximum(np.linalg.norm(test, axis=1, keepdims=True), 1e-12)
    chunk = max(1, 2**24 // len(train))  # about 128 MB of similarities at a time
    out = np.empty((len(test), k), dtype=np.int64)
    for start in range(0, len(test), chunk):
        similarity = test[start : start + chunk] @ train.T
        top = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(similarity, top, axis=1), axis=1, kind="stable")
        out[start : start + chunk] = np.take_along_axis(top, order, axis=1)
    return out


def _retrieval_figure(
    query_images: np.ndarray,
    query_labels: np.ndarray,
    neighbour_images: np.ndarray,
    neighbour_labels: np.ndarray,
    class_names: Sequence[str] | None = None,
) -> Figure:
    """The retrieval grid as an open figure (Q rows, 1 + K columns); callers save and close it."""
    query_images, neighbour_images = np.asarray(query_images), np.asarray(neighbour_images)
    query_labels, neighbour_labels = np.asarray(query_labels), np.asarray(neighbour_labels)
    if query_images.ndim != 4 or neighbour_images.ndim != 5:
        raise ValueError(
            f"_retrieval_figure: want query images Q x H x W x C and neighbours Q x K x H x W x C, "
            f"got {query_images.shape} and {neighbour_images.shape}"
        )
    q, k = neighbour_images.shape[:2]
    if len(query_images) != q or query_labels.shape != (q,) or neighbour_labels.shape != (q, k):
        raise ValueError(
            f"_retrieval_figure: shapes disagree: queries {query_images.shape}, labels {query_labels.shape}, "
            f"neighbours {neighbour_images.shape}, neighbour labels {neighbour_labels.shape}"
        )

    def name(label: int) -> str:
        return class_names[label] if class_names is not None else str(label)

    def show(ax: Axes, image: np.ndarray, frame: str, title: str, weight: str = "normal") -> None:
        ax.imshow(image, interpolation="nearest")
        ax.set(xticks=[], yticks=[])
        ax.set_title(title, fontsize=6, color=frame, fontweight=weight, pad=2)
        for spine in ax.spines.values():
            spine.set_edgecolor(frame)
            spine.set_linewidth(2.5)

    fig, axes = _pyplot().subplots(q, k + 1, figsize=(0.9 * (k + 1), 0.95 * q), squeeze=False)
    for i in range(q):
        show(axes[i, 0], query_images[i], QUERY_FRAME, name(int(query_labels[i])), weight="bold")
        for j in range(k):
            same = neighbour_labels[i, j] == query_labels[i]
            show(
                axes[i, j + 1],
                neighbour_images[i, j],
                SAME_CLASS if same else OTHER_CLASS,
                name(int(neighbour_labels[i, j])),
            )
    fig.subplots_adjust(left=0.02, right=0.98, top=0.9, bottom=0.02, wspace=0.1, hspace=0.4)
    fig.suptitle("query, then nearest training images (green: same class)", fontsize=7)
    return fig


def plot_retrieval_grid(
    query_images: np.ndarray,
    query_labels: np.ndarray,
    neighbour_images: np.ndarray,
    neighbour_labels: np.ndarray,
    path: str | Path,
    class_names: list[str] | None = None,
) -> Path:
    """Each query beside its nearest training images, framed green (same class) or red: what the kNN sees.

    Images are uint8, queries Q x H x W x 3 and neighbours Q x K x H x W x 3, nearest first.
    """
    fig = _retrieval_figure(query_images, query_labels, neighbour_images, neighbour_labels, class_names)
    return _save(fig, path)


def plot_sweep(
    values: dict[str, Sequence],
    scores: Sequence[float | None],
    metric: str,
    mode: str,
    log_keys: Sequence[str],
    path: str | Path,
    finished: Sequence[bool] | None = None,
) -> Path:
    """A sweep's metric against each searched param, one panel per param (a point per trial): where the good
    region lies, and whether the range was wide enough. Trials stopped early (hollow) scored at fewer epochs;
    trials that never reported the metric are left out."""
    if not values:
        raise ValueError("plot_sweep: no searched params")
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(values), figsize=(4 * len(values), 3.2), layout="constrained", squeeze=False)
    kept = [i for i, score in enumerate(scores) if score is not None]
    finished = finished if finished is not None else [True] * len(scores)
    best = (max if mode == "max" else min)(kept, key=lambda i: scores[i]) if kept else None
    for ax, (key, column) in zip(axes[0], values.items()):
        numeric = all(isinstance(column[i], int | float) and not isinstance(column[i], bool) for i in kept)
        x = {i: column[i] if numeric else str(column[i]) for i in kept}
        for done, style, label in (
            (True, {"color": "#1f77b4"}, "ran every epoch"),
            (False, {"facecolors": "none", "edgecolors": "#1f77b4"}, "stopped early"),
        ):
            chosen = [i for i in kept if bool(finished[i]) == done]
            if chosen:
                ax.scatter([x[i] for i in chosen], [scores[i] for i in chosen], label=label, **style)
        if best is not None:
            ax.scatter([x[best]], [scores[best]], color=OTHER_CLASS, marker="*", s=150, label="best")
        if key in log_keys:
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # labels within a single decade too
            ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set(xlabel=key, ylabel=metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small")
    fig.suptitle(f"{metric} of {len(kept)} trials")
    return _save(fig, path)


def plot_image_pairs(pairs: list[tuple[np.ndarray, np.ndarray, str]], path: str | Path, columns: int = 4) -> Path:
    """Pairs of images side by side, each pair titled (a near-duplicate report: the cosine similarity); uint8
    H x W x 3 images, any sizes."""
    plt = _pyplot()
    rows = max(1, -(-len(pairs) // columns))
    fig, axes = plt.subplots(rows, 2 * columns, figsize=(2.4 * columns, 1.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for n, (first, second, title) in enumerate(pairs):
        left, right = axes[n // columns, 2 * (n % columns)], axes[n // columns, 2 * (n % columns) + 1]
        left.imshow(first)
        right.imshow(second)
        left.set_title(title, fontsize=7, loc="left")
    fig.tight_layout(pad=0.3)
    return _save(fig, path)
