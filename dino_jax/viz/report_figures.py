"""The figures of a run's report (`run_report.py`): curves of values against step, a panel each,
and 2-D maps of test features coloured by class. Drawn with matplotlib's Agg canvas; nothing here
reads a file."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dino_jax.viz.attention import agg_figure


@dataclasses.dataclass(frozen=True)
class Series:
    label: str
    steps: np.ndarray
    values: np.ndarray
    style: str = "-"


@dataclasses.dataclass(frozen=True)
class Panel:
    title: str
    series: list[Series]
    ylabel: str = ""
    log_y: bool = False
    hlines: tuple[tuple[float, str], ...] = ()  # (value, label) drawn dashed


def series_of(rows: Sequence[Mapping[str, Any]], key: str, label: str, style: str = "-") -> list[Series]:
    """The `key` column of `rows` as one series, or none where no row has it (an older run)."""
    points = [(row["step"], row[key]) for row in rows if key in row]
    if not points:
        return []
    steps, values = np.asarray(points, np.float64).T
    return [Series(label, steps, values, style)]


def panel_figure(panels: Sequence[Panel], *, columns: int = 2):
    """One figure, a subplot per panel (value against step)."""
    columns = min(columns, len(panels))
    rows = -(-len(panels) // columns)
    figure = agg_figure(5.0 * columns, 3.2 * rows)
    for index, panel in enumerate(panels):
        axes = figure.add_subplot(rows, columns, index + 1)
        for series in panel.series:
            # Points on a short line; a marker-only style ("s") keeps its own marker (marker=None
            # would erase it).
            marker = {"marker": "o"} if len(series.steps) < 30 and series.style in ("-", "--") else {}
            axes.plot(series.steps, series.values, series.style, label=series.label, markersize=3, **marker)
        for value, label in panel.hlines:
            axes.axhline(value, color="grey", linestyle=":", linewidth=1, label=label)
        if panel.log_y and all(np.all(series.values > 0) for series in panel.series):
            axes.set_yscale("log")
        axes.set_title(panel.title, fontsize=10)
        axes.set_xlabel("step")
        if panel.ylabel:
            axes.set_ylabel(panel.ylabel)
        axes.grid(alpha=0.3)
        if len(panel.series) + len(panel.hlines) > 1:
            axes.legend(fontsize=7)
    figure.tight_layout()
    return figure


def knn_panel(monitor_rows, results, config, *, last_step: int) -> Panel:
    """The monitor's kNN top-1 over training, with the whole-split kNN of the untrained and the
    trained teacher (results.json) as points where the run has them."""
    k = config.eval.monitor_knn_k
    series = []
    for network, style in (("teacher", "-"), ("student", "--")):
        series += series_of(
            monitor_rows, f"monitor_{network}_knn_k{k}_top1", f"{network} (monitor subsets)", style
        )
    if series:
        for key, step, label in (
            (f"random_init_knn_k{k}_top1", 0, "untrained, whole splits"),
            (f"knn_k{k}_top1", last_step, "trained teacher, whole splits"),
        ):
            if key in results:
                series.append(Series(label, np.array([step]), np.array([results[key]]), "s"))
    return Panel(f"weighted kNN top-1 (k={k}), percent", series, "%")


def feature_map_projections(features_NxD: np.ndarray, *, log=lambda message: None) -> dict[str, np.ndarray]:
    """2-D embeddings `(N, 2)` of L2-normalised features (the kNN's geometry): `pca` always,
    `tsne` with scikit-learn, `umap` where umap-learn is installed."""
    features = np.asarray(features_NxD, np.float64)
    features = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    centred = features - features.mean(axis=0)
    _, _, components = np.linalg.svd(centred, full_matrices=False)
    projections = {"pca": centred @ components[:2].T}
    if len(features) < 5:
        return projections
    try:
        from sklearn.manifold import TSNE
        from threadpoolctl import threadpool_limits
    except ImportError:
        log("note: no t-SNE map (scikit-learn is not installed)")
    else:
        perplexity = min(30.0, (len(features) - 1) / 3)
        # One thread: on a busy machine its OpenMP threads wait on each other (30x slower, measured).
        with threadpool_limits(1):
            projections["tsne"] = TSNE(2, perplexity=perplexity, init="pca", random_state=0).fit_transform(
                features
            )
    try:
        import umap
    except ImportError:
        pass
    else:
        projections["umap"] = umap.UMAP(n_components=2, random_state=0).fit_transform(features)
    return projections


_METHOD_NAMES = {"pca": "PCA", "tsne": "t-SNE", "umap": "UMAP"}


def feature_map_figure(
    points_Nx2: np.ndarray, labels_N: np.ndarray, num_classes: int, what: str, method: str
):
    """The points of one 2-D map coloured by class; `what` (the features' description) and the
    method (`pca`, `tsne`, `umap`) make the title."""
    figure = agg_figure(6.0, 5.4)
    axes = figure.add_subplot(1, 1, 1)
    labels = np.asarray(labels_N)
    colours = "tab10" if num_classes <= 10 else "tab20" if num_classes <= 20 else "nipy_spectral"
    scatter = axes.scatter(
        points_Nx2[:, 0],
        points_Nx2[:, 1],
        c=labels,
        cmap=colours,
        s=6,
        vmin=0,
        vmax=max(num_classes - 1, 1),
    )
    if num_classes <= 20:
        handles, names = scatter.legend_elements(num=None)
        axes.legend(handles, names, title="class", fontsize=6, title_fontsize=7, loc="best", markerscale=0.6)
    else:
        figure.colorbar(scatter, ax=axes, label="class")
    axes.set_title(f"{_METHOD_NAMES[method]} of {what}", fontsize=9)
    axes.set_xticks([])
    axes.set_yticks([])
    figure.tight_layout()
    return figure
