"""The HTML of a run's report (`run_report.py` gathers what it shows): the summary, the results
beside those of the PyTorch project this one replaces, the kNN monitor's table, and the figures and
attention panels by their paths relative to the workdir, so the workdir can be copied or served as
it is."""

from __future__ import annotations

import datetime
import html
import os
from collections.abc import Mapping, Sequence

import numpy as np

from dino_jax import config as config_lib
from dino_jax.data import image_folder, sources
from dino_jax.data.image_files import ImageFileError
from dino_jax.hooks.metrics_log import format_duration

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
    return f'<p><img src="{html.escape(figures[name])}" alt="{html.escape(alt)}"></p>'


def planned_steps(config) -> int | str:
    """The steps the run was planned to take, from the size of what it trains on (a named
    dataset's pretraining split, as `DATASETS` records it; a folder's files, listed, not read);
    "?" where that is unknown (a folder no longer there)."""
    d = config.dataset
    if d.name == image_folder.FOLDER:
        try:
            count = len(image_folder.list_folder(d.train_dir).files)
        except (ImageFileError, OSError):
            return "?"
    elif d.name in sources.DATASETS:
        spec = sources.DATASETS[d.name]
        count = spec.num_pretrain or spec.num_train
    else:
        return "?"
    return config_lib.plan_steps(config, count).train_steps


def page(
    workdir, config, *, train_rows, monitor_rows, results, figures, attention, feature_map_what, notes
) -> str:
    """The whole page. `figures` maps a figure's name (`loss`, `knn`, `features_pca`, ...) to its
    path relative to the workdir, `attention` lists `(step, path)` of the attention panels, and
    `feature_map_what` describes the features of the maps (None: no map)."""
    name = config.dataset.name
    total = planned_steps(config)
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
        summary.append(["training wall time", format_duration(results["train_wall_s"])])
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
        parts.append(f"<p>{html.escape(feature_map_what)}, L2-normalised, coloured by class.</p>")
        parts += [_figure_html(figures, name, name.replace("_", " ")) for name in maps]
    else:
        parts.append("<p>No feature map (no checkpoint or dataset to compute it from).</p>")
    parts.append("</body></html>")
    return "\n".join(part for part in parts if part)
