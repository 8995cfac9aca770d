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

This module gathers what the page shows from the workdir's files; `report_figures.py` draws the
figures (PNGs, matplotlib's Agg canvas) and `report_html.py` writes the page, which links them by
relative paths. Nothing here reads a checkpoint or runs a network.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
from collections.abc import Callable, Sequence

import ml_collections
import numpy as np

from dino_jax.eval import report as results_report
from dino_jax.hooks import metrics_log
from dino_jax.viz import report_html
from dino_jax.viz.report_figures import (
    Panel,
    Series,
    feature_map_figure,
    feature_map_projections,
    knn_panel,
    panel_figure,
    series_of,
)

REPORT_HTML = "report.html"
FIGURES_DIR = "report"
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

    written: dict[str, str] = {}  # figure name -> its path relative to the workdir

    def save(name: str, figure) -> None:
        figure.savefig(os.path.join(figures_dir, name + ".png"), dpi=100, bbox_inches="tight")
        written[name] = f"{FIGURES_DIR}/{name}.png"

    uniform = (math.log(out_dim), f"ln(out_dim) = {math.log(out_dim):.2f}: uniform collapse")
    if train_rows:

        def curve(key: str, label: str | None = None, style: str = "-") -> list[Series]:
            return series_of(train_rows, key, label or key, style)

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
    monitor_panel = knn_panel(
        monitor_rows, results, config, last_step=train_rows[-1]["step"] if train_rows else 0
    )
    if monitor_panel.series:
        save("knn", panel_figure([monitor_panel]))
    maps = {}
    if feature_map is not None:
        maps = feature_map_projections(feature_map.features, log=log)
        for method, points in maps.items():
            save(
                f"features_{method}",
                feature_map_figure(
                    points, feature_map.labels, feature_map.num_classes, feature_map.what, method
                ),
            )

    text = report_html.page(
        workdir,
        config,
        train_rows=train_rows,
        monitor_rows=monitor_rows,
        results=results,
        figures=written,
        attention=_attention_panels(workdir),
        feature_map_what=feature_map.what if feature_map is not None else None,
        notes=notes,
    )
    path = os.path.join(workdir, REPORT_HTML)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
    return path


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
