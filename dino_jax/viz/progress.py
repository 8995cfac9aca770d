"""A run's progress from the files it writes, also while it is still writing them: the training
curves of `metrics.jsonl` (one JSON object per logged step, and one per call of the kNN monitor:
`dino_jax.hooks.metrics_log`) and the attention panels of `attention/step_<step>.png`
(`hooks.monitors.AttentionPanel`). The notebooks show these inline; `dino_jax.viz.run_report` draws
the same files into report.html."""

from __future__ import annotations

import glob
import math
import os
from collections.abc import Sequence

import numpy as np

from dino_jax.hooks import metrics_log

# What a first look at a run needs, in this order; `plot_curves` draws these of them that exist,
# then the kNN monitor's top-1 curves (`knn_curves`).
MAIN_CURVES = ("loss", "lr", "weight_decay", "momentum", "teacher_entropy", "images_per_s")


def read_metrics(workdir: str) -> dict[str, np.ndarray]:
    """The columns of `<workdir>/metrics.jsonl`: `"step"` and every metric with a number in some
    row, each a float64 array with one entry per row (NaN where a row lacks it: the kNN monitor's
    rows hold only its own metrics). A line cut short (a run killed or still writing) is skipped.
    Empty when the run has logged nothing yet."""
    rows = metrics_log.read_metrics(workdir)
    names = sorted({k for row in rows for k, v in row.items() if isinstance(v, (int, float))})
    columns = {name: np.array([row.get(name, math.nan) for row in rows], np.float64) for name in names}
    return {"step": columns.pop("step"), **columns} if rows else {}


def knn_curves(metrics: dict[str, np.ndarray]) -> list[str]:
    """The kNN monitor's top-1 columns (`monitor_{teacher,student}_knn_k{k}_top1`), teacher first."""
    return sorted((n for n in metrics if n.startswith("monitor_") and n.endswith("_top1")), reverse=True)


def plot_curves(metrics: dict[str, np.ndarray], names: Sequence[str] | None = None, *, columns: int = 3):
    """A matplotlib figure with one panel per metric in `names` (default: `MAIN_CURVES` and
    `knn_curves`), each against the steps that logged it; names missing from `metrics` are left
    out."""
    import matplotlib.pyplot as plt

    if names is None:
        names = [*MAIN_CURVES, *knn_curves(metrics)]
    names = [name for name in names if name in metrics]
    if not names:
        raise ValueError(f"none of the metrics asked for is logged; the run has {sorted(metrics)}")
    rows = math.ceil(len(names) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.4 * columns, 2.5 * rows), squeeze=False)
    for axis, name in zip(axes.flat, names):
        logged = ~np.isnan(metrics[name])  # a NaN would break the line at every other kind of row
        steps, values = metrics["step"][logged], metrics[name][logged]
        axis.plot(steps, values, marker="." if len(steps) < 30 else None)
        axis.set_title(name, fontsize=10)
        axis.set_xlabel("step", fontsize=8)
        axis.tick_params(labelsize=8)
    for axis in axes.flat[len(names) :]:
        axis.axis("off")
    figure.tight_layout()
    return figure


def attention_panels(workdir: str) -> list[tuple[int, str]]:
    """`(step, path)` of each attention panel the run has written, by step."""
    paths = glob.glob(os.path.join(workdir, "attention", "step_*.png"))
    return sorted((int(os.path.basename(path)[len("step_") : -len(".png")]), path) for path in paths)


def spread(items: Sequence, count: int) -> list:
    """At most `count` of `items`, evenly spaced, the first and the last included (the last alone
    for a count of 1)."""
    if len(items) <= count:
        return list(items)
    if count == 1:
        return [items[-1]]
    return [items[round(i * (len(items) - 1) / (count - 1))] for i in range(count)]


def plot_panels(panels: Sequence[tuple[int, str]], *, columns: int = 3, width: float = 6.0):
    """A matplotlib figure of attention panels (`attention_panels` entries), each titled with its
    step, `width` inches wide, `columns` to a row."""
    import matplotlib.pyplot as plt

    if not panels:
        raise ValueError("no attention panels to show")
    images = [plt.imread(path) for _, path in panels]
    height = width * images[0].shape[0] / images[0].shape[1]
    columns = min(columns, len(images))
    rows = math.ceil(len(images) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(width * columns, height * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, (step, _), image in zip(axes.flat, panels, images):
        axis.imshow(image)
        axis.set_title(f"step {step}")
    figure.tight_layout()
    return figure
