"""The report of a training run: `<workdir>/report.html` and its figures in `<workdir>/report/`.

It reads what a run writes as it goes (`config.json`, `metrics.jsonl`, `results.json`,
`attention/step_*.png`), so it can be written for a finished run and for one still training. The
page shows:
- the results next to those of the PyTorch project this one replaces (CIFAR-100, Tiny-ImageNet);
- the curves: loss, the schedules (lr, weight decay, teacher momentum and temperature), the
  teacher's entropies and the teacher -> student KL, the kNN monitor, images/s;
- the attention panels logged over training;
- a 2-D map of test features coloured by class (PCA; t-SNE with scikit-learn, UMAP where
  `umap-learn` is installed), given the features (`dino_jax.modes.report` extracts them).

Figures are PNGs drawn with matplotlib's Agg canvas; the page links them by relative paths, so the
workdir can be copied or served as it is. Nothing here reads a checkpoint or runs a network.
"""

from __future__ import annotations

import dataclasses
import datetime
import glob
import html
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from dino_jax import config as config_lib
from dino_jax.data import sources
from dino_jax.eval import report as results_report
from dino_jax.hooks import metrics_log
from dino_jax.viz.attention import agg_figure

REPORT_HTML = "report.html"
FIGURES_DIR = "report"

# The PyTorch project this one replaces (ViT-Tiny, 100-300 epochs; docs/results.md): per training
# dataset, (what, our metric names, its figure). It names no k for STL-10 kNN and no classifier for
# 5-shot; ours are shown for k=5 and k=20, and for both classifiers.
REPLACED_PROJECT: dict[str, list[tuple[str, tuple[str, ...], float]]] = {
    "cifar100": [
        ("kNN k=5 top-1", ("knn_k5_top1",), 59.34),
        ("linear top-1 (best epoch)", ("linear_best_test_top1",), 61.0),
        ("STL-10 kNN top-1 (k=5, k=20)", ("stl10_knn_k5_top1", "stl10_knn_k20_top1"), 63.40),
        ("STL-10 linear top-1 (best epoch)", ("stl10_linear_best_test_top1",), 64.12),
        ("STL-10 5-shot (NCM, logreg)", ("stl10_fewshot_5shot_ncm", "stl10_fewshot_5shot_logreg"), 56.97),
    ],
    "tiny_imagenet": [
        ("kNN k=5 top-1", ("knn_k5_top1",), 53.04),
        ("linear top-1 (best epoch)", ("linear_best_test_top1",), 54.29),
        ("STL-10 kNN top-1 (k=5, k=20)", ("stl10_knn_k5_top1", "stl10_knn_k20_top1"), 53.22),
        ("STL-10 linear top-1 (best epoch)", ("stl10_linear_best_test_top1",), 55.48),
        ("STL-10 5-shot (NCM, logreg)", ("stl10_fewshot_5shot_ncm", "stl10_fewshot_5shot_logreg"), 50.34),
    ],
}
# Panels of the attention logged over training shown in the page (the first, the last, and evenly
# spaced ones between).
MAX_ATTENTION_PANELS = 6


@dataclasses.dataclass(frozen=True)
class FeatureMap:
    """Features `(N, D)` of test images with their labels, for the 2-D maps; `what` says which."""

    features: np.ndarray
    labels: np.ndarray
    num_classes: int
    what: str


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


def write_report(
    workdir: str,
    config: ml_collections.ConfigDict,
    *,
    feature_map: FeatureMap | None = None,
    notes: Sequence[str] = (),
    log: Callable[[str], None] = lambda message: None,
) -> str:
    """Writes `<workdir>/report.html` and `<workdir>/report/*.png` from the run's files as they are
    now; returns the page's path. `notes` are shown at the top (e.g. why there is no feature map)."""
    figures_dir = os.path.join(workdir, FIGURES_DIR)
    os.makedirs(figures_dir, exist_ok=True)
    rows = metrics_log.read_metrics(workdir)
    train_rows = [row for row in rows if "loss" in row]
    monitor_rows = [row for row in rows if any(key.startswith("monitor_") for key in row)]
    results = results_report.read_results(workdir)
    out_dim = config.head.out_dim

    written: dict[str, str] = {}  # figure name -> file name in FIGURES_DIR

    def save(name: str, figure) -> None:
        figure.savefig(os.path.join(figures_dir, name + ".png"), dpi=100, bbox_inches="tight")
        written[name] = name + ".png"

    uniform = (math.log(out_dim), f"ln(out_dim) = {math.log(out_dim):.2f}: uniform collapse")
    if train_rows:

        def curve(key: str, label: str | None = None, style: str = "-") -> list[Series]:
            return _series(train_rows, key, label or key, style)

        figure_panels = {
            "loss": [
                Panel("DINO loss", curve("loss"), "nats", hlines=(uniform,)),
                Panel("KL(teacher || student)", curve("teacher_student_kl", "KL"), "nats"),
            ],
            "schedules": [
                Panel("learning rate", curve("lr"), log_y=True),
                Panel("weight decay", curve("weight_decay")),
                Panel("teacher momentum", curve("momentum")),
                Panel("teacher temperature", curve("teacher_temperature")),
            ],
            "teacher": [
                Panel(
                    "teacher entropies",
                    curve("teacher_entropy", "per image")
                    + curve("teacher_batch_entropy", "of the batch mean", "--"),
                    "nats",
                    hlines=(uniform,),
                ),
                Panel(
                    "gradient and update norms (student)",
                    curve("grad_norm", "gradient") + curve("update_norm", "update", "--"),
                    log_y=True,
                ),
            ],
            "throughput": [
                Panel("images/s (training, with the monitor's pauses)", curve("images_per_s", "images/s"))
            ],
        }
        for name, panels in figure_panels.items():
            save(name, panel_figure(panels))
    knn_panel = _knn_panel(
        monitor_rows, results, config, last_step=train_rows[-1]["step"] if train_rows else 0
    )
    if knn_panel.series:
        save("knn", panel_figure([knn_panel]))
    maps = {}
    if feature_map is not None:
        maps = feature_map_projections(feature_map.features, log=log)
        for method, points in maps.items():
            save(f"features_{method}", feature_map_figure(points, feature_map, method))

    page = _page(
        workdir,
        config,
        train_rows=train_rows,
        monitor_rows=monitor_rows,
        results=results,
        figures=written,
        attention=_attention_panels(workdir),
        feature_map=feature_map,
        notes=notes,
    )
    path = os.path.join(workdir, REPORT_HTML)
    with open(path + ".tmp", "w") as f:
        f.write(page)
    os.replace(path + ".tmp", path)
    return path


# ---------------------------------------------------------------------------------------------
# Figures.


def _series(rows: Sequence[Mapping[str, Any]], key: str, label: str, style: str = "-") -> list[Series]:
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


def _knn_panel(monitor_rows, results, config, *, last_step: int) -> Panel:
    """The monitor's kNN top-1 over training, with the whole-split kNN of the untrained and the
    trained teacher (results.json) as points where the run has them."""
    k = config.eval.monitor_knn_k
    series = []
    for network, style in (("teacher", "-"), ("student", "--")):
        series += _series(
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


def feature_map_figure(points_Nx2: np.ndarray, feature_map: FeatureMap, method: str):
    figure = agg_figure(6.0, 5.4)
    axes = figure.add_subplot(1, 1, 1)
    labels = np.asarray(feature_map.labels)
    colours = (
        "tab10"
        if feature_map.num_classes <= 10
        else "tab20"
        if feature_map.num_classes <= 20
        else "nipy_spectral"
    )
    scatter = axes.scatter(
        points_Nx2[:, 0],
        points_Nx2[:, 1],
        c=labels,
        cmap=colours,
        s=6,
        vmin=0,
        vmax=max(feature_map.num_classes - 1, 1),
    )
    if feature_map.num_classes <= 20:
        handles, names = scatter.legend_elements(num=None)
        axes.legend(handles, names, title="class", fontsize=6, title_fontsize=7, loc="best", markerscale=0.6)
    else:
        figure.colorbar(scatter, ax=axes, label="class")
    axes.set_title(f"{_METHOD_NAMES[method]} of {feature_map.what}", fontsize=9)
    axes.set_xticks([])
    axes.set_yticks([])
    figure.tight_layout()
    return figure


def _attention_panels(workdir: str) -> list[tuple[int, str]]:
    """`(step, path relative to the workdir)` of up to MAX_ATTENTION_PANELS logged panels."""
    paths = sorted(glob.glob(os.path.join(workdir, "attention", "step_*.png")))
    if len(paths) > MAX_ATTENTION_PANELS:
        picks = np.linspace(0, len(paths) - 1, MAX_ATTENTION_PANELS).round().astype(int)
        paths = [paths[i] for i in sorted(set(picks))]
    panels = []
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        panels.append((int(stem.split("_")[1]), os.path.relpath(path, workdir)))
    return panels


# ---------------------------------------------------------------------------------------------
# The page.

_STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
td, th { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.note { background: #fff4d6; padding: 0.5em 1em; border-left: 4px solid #e0a800; }
.strip { display: flex; gap: 1em; overflow-x: auto; align-items: flex-start; }
figure { margin: 0; } figcaption { text-align: center; font-size: 0.9em; }
img { max-width: 100%; }
code { background: #f3f3f3; padding: 0 0.2em; }
"""


def _percent(results: Mapping[str, float], key: str) -> str:
    if key not in results:
        return "-"
    ci = results.get(key + "_ci95")
    return f"{results[key]:.2f}" + (f" ± {ci:.2f}" if ci is not None else "")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _results_tables(results: Mapping[str, float], config, *, evaluated: bool) -> str:
    name = config.dataset.name
    parts = (
        []
        if evaluated
        else ["<p>No evaluation yet: it runs when training ends (or <code>--mode=eval</code>).</p>"]
    )
    ks = [k for k in config.eval.knn_ks if f"knn_k{k}_top1" in results]
    if ks:
        parts.append("<h3>Weighted kNN of the teacher (whole splits)</h3>")
        parts.append(
            _table(
                ["k", "top-1", "top-5", "untrained top-1", "untrained top-5"],
                [
                    [str(k)]
                    + [
                        _percent(results, f"{prefix}knn_k{k}_top{top}")
                        for prefix in ("", "random_init_")
                        for top in (1, 5)
                    ]
                    for k in ks
                ],
            )
        )
    other = [
        ("linear probe, best test top-1", "linear_best_test_top1"),
        ("linear probe, final test top-1", "linear_test_top1"),
        ("linear probe, train top-1", "linear_train_top1"),
        ("5-shot, nearest class mean", "fewshot_5shot_ncm"),
        ("5-shot, logistic regression", "fewshot_5shot_logreg"),
    ]
    other += [(f"{data} {what}", f"{data}_{key}") for data in config.eval.transfer for what, key in other]
    other_rows = [[what, _percent(results, key)] for what, key in other if key in results]
    if other_rows:
        parts.append(_table(["metric (percent)", "this run"], other_rows))
    if name in REPLACED_PROJECT:
        comparison = [
            [what, " / ".join(_percent(results, key) for key in keys), f"{theirs:.2f}"]
            for what, keys, theirs in REPLACED_PROJECT[name]
        ]
        parts.append(f"<h3>Against the PyTorch project this replaces ({html.escape(name)})</h3>")
        parts.append(_table(["metric (percent)", "this run", "the project this replaces"], comparison))
        parts.append(
            "<p>It names no k for its STL-10 kNN figure and no classifier for its 5-shot one: ours are "
            "given for k=5 and k=20, nearest class mean and logistic regression.</p>"
        )
    else:
        parts.append(f"<p>The project this replaces gives no figure for {html.escape(name)}.</p>")
    return "\n".join(parts)


def _monitor_table(monitor_rows, config, *, max_rows: int = 40) -> str:
    k = config.eval.monitor_knn_k
    columns = [
        key
        for key in (f"monitor_teacher_knn_k{k}_top1", f"monitor_student_knn_k{k}_top1", "monitor_seconds")
        if any(key in row for row in monitor_rows)
    ]
    if not columns:
        return ""
    shown = monitor_rows
    if len(shown) > max_rows:
        shown = [
            monitor_rows[i]
            for i in sorted(set(np.linspace(0, len(monitor_rows) - 1, max_rows).round().astype(int)))
        ]
    header = ["step"] + [
        key.replace("monitor_", "").replace(f"_knn_k{k}_top1", f" kNN k={k} top-1 %") for key in columns
    ]
    rows = [
        [str(row["step"])] + [f"{row[key]:.2f}" if key in row else "-" for key in columns] for row in shown
    ]
    return _table(header, rows)


def _figure_html(figures: Mapping[str, str], name: str, alt: str) -> str:
    if name not in figures:
        return ""
    return f'<p><img src="{FIGURES_DIR}/{figures[name]}" alt="{html.escape(alt)}"></p>'


def _page(
    workdir, config, *, train_rows, monitor_rows, results, figures, attention, feature_map, notes
) -> str:
    name = config.dataset.name
    spec = sources.DATASETS.get(name)
    total = config_lib.plan_steps(config, spec.num_train).train_steps if spec else None
    last = train_rows[-1]["step"] if train_rows else 0
    evaluated = any(key.startswith(("knn_", "linear_", "fewshot_")) for key in results)
    status = (
        f"finished: {last} of {total} steps, evaluated"
        if evaluated
        else f"in progress, or stopped before its evaluation: {last} of {total} steps logged"
    )
    m = config.model
    summary = [
        [
            "dataset",
            name
            + (" (SYNTHETIC: random images, accuracies mean nothing)" if config.dataset.synthetic else ""),
        ],
        ["status", status],
        [
            "model",
            f"ViT {m.variant} ({m.embed_dim or 'variant'}-d x {m.depth or 'variant'}), patch {m.patch_size}",
        ],
        ["head", f"out_dim {config.head.out_dim}, BatchNorm {config.head.use_bn}"],
        ["batch, epochs", f"{config.train.batch_size}, {config.train.epochs}"],
        ["lr (per 256), teacher momentum", f"{config.train.lr:g}, {config.train.momentum_teacher:g}"],
    ]
    if "train_wall_s" in results:
        summary.append(["training wall time", metrics_log.format_duration(results["train_wall_s"])])
    if train_rows and "images_per_s" in train_rows[-1]:
        summary.append(["images/s (last logged)", f"{train_rows[-1]['images_per_s']:.0f}"])
    made = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    title = f"DINO run: {os.path.basename(os.path.abspath(workdir))}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        (
            f"<p>Written {made} from the files in <code>{html.escape(os.path.abspath(workdir))}</code>; "
            f"<code>python launch.py --mode=report --workdir={html.escape(workdir)}</code> writes it "
            "again (also while the run trains).</p>"
        ),
    ]
    parts += [f'<p class="note">{html.escape(note)}</p>' for note in notes]
    parts.append(_table(["", ""], summary))
    parts.append("<h2>Results</h2>")
    parts.append(_results_tables(results, config, evaluated=evaluated))
    parts.append("<h2>Training</h2>")
    if not train_rows:
        parts.append("<p>No logged step yet (metrics.jsonl is empty or missing).</p>")
    parts.append(_figure_html(figures, "loss", "loss and KL over training"))
    parts.append(_figure_html(figures, "schedules", "schedules over training"))
    parts.append(_figure_html(figures, "teacher", "teacher entropies and norms over training"))
    parts.append(_figure_html(figures, "throughput", "images per second over training"))
    parts.append("<h2>kNN over training</h2>")
    if "knn" in figures:
        e = config.eval
        parts.append(
            f"<p>The kNN monitor: weighted kNN (k={e.monitor_knn_k}, T={e.knn_temperature:g}) on fixed subsets "
            f"of up to {e.monitor_train_images} train and {e.monitor_test_images} test images, every "
            f"{e.monitor_every_epochs:g} epoch(s); step 0 is the untrained network.</p>"
        )
        parts.append(_figure_html(figures, "knn", "kNN accuracy over training"))
        parts.append(_monitor_table(monitor_rows, config))
    else:
        parts.append("<p>No kNN monitor in this run (<code>eval.monitor_every_epochs</code>).</p>")
    parts.append("<h2>Attention over training</h2>")
    if attention:
        strip = "".join(
            f'<figure><img src="{html.escape(path)}" alt="attention at step {step}"><figcaption>step {step}'
            "</figcaption></figure>"
            for step, path in attention
        )
        parts.append(
            "<p>The teacher's last-block CLS attention on fixed test images (rows: image, mean, each head, "
            f'the 60% masks).</p><div class="strip">{strip}</div>'
        )
    else:
        parts.append("<p>No attention panel logged (<code>eval.attention_every_steps</code>).</p>")
    parts.append("<h2>Test features</h2>")
    maps = [name for name in ("features_pca", "features_tsne", "features_umap") if name in figures]
    if maps:
        parts.append(f"<p>{html.escape(feature_map.what)}, L2-normalised, coloured by class.</p>")
        parts += [_figure_html(figures, name, name.replace("_", " ")) for name in maps]
    else:
        parts.append("<p>No feature map (no checkpoint or dataset to compute it from).</p>")
    parts.append("</body></html>")
    return "\n".join(part for part in parts if part)
