"""The evaluation's report: markdown tables of a results dict, and the run's `results.json` and
`results.md`, which only `write_results` writes.

`results.json` maps metric names to numbers (accuracies in percent) and is merged, not replaced, so
what a run wrote before (the untrained network's kNN, training figures) survives the evaluation.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from typing import Mapping, Sequence

from dino_jax.eval import fewshot, linear
from dino_jax.eval.suite import SuiteSettings

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"


def _pct(results, key) -> str:
    return f"{results[key]:.2f}" if key in results else "-"


def _ci(results, key) -> str:
    if key not in results:
        return "-"
    return f"{results[key]:.2f} ± {results[key + '_ci95']:.2f}"


def results_markdown(
    results: Mapping[str, float],
    *,
    main_name: str,
    transfer_names: Sequence[str] = (),
    settings: SuiteSettings,
    command: str | None = None,
    main_note: str | None = None,
) -> str:
    """Markdown tables of `results` (as `suite.evaluate_*` return them), each headed by `command`
    (default: this process's command line); `main_note`, if given, under the main dataset's heading
    (why it has no tables, say)."""
    command = command if command is not None else default_command()
    heading = f"Command: `{command}`\n"
    lines = ["# Evaluation results", ""]
    k_shot = settings.fewshot_k_shot
    n_blocks = int(results.get("linear_n_last_blocks", settings.linear_n_last_blocks))
    base_lr = results.get("linear_base_lr", settings.linear_base_lrs[0])
    feature = (
        "CLS and mean patch token of the last block"
        if settings.linear_avgpool
        else f"CLS of the last {n_blocks} blocks"
    )
    linear_setup = (
        f"{feature}, {settings.linear_epochs} epochs, batch {settings.linear_batch_size}, "
        f"lr {linear.scaled_learning_rate(settings.linear_batch_size, base_lr):g}"
    )
    if settings.linear_augment:
        linear_setup += ", trained on a RandomResizedCrop + flip view of each image per epoch"
    if len(settings.linear_base_lrs) > 1:
        linear_setup += (
            f", best of base rates {list(settings.linear_base_lrs)} per 256 (chosen on test top-1)"
        )

    lines += [f"## {main_name}", ""]
    if main_note:
        lines += [main_note, ""]
    if "linear_test_top1" in results:
        lines += [
            f"### Linear probe ({linear_setup})",
            "",
            heading,
            "| train top-1 | train loss | test top-1 (final) | test top-1 (best, epoch) | "
            "test top-5 | test loss |",
            "|---|---|---|---|---|---|",
            f"| {_pct(results, 'linear_train_top1')} | {results['linear_train_loss']:.4f} | "
            f"{_pct(results, 'linear_test_top1')} | {_pct(results, 'linear_best_test_top1')} "
            f"({int(results['linear_best_epoch'])}) | {_pct(results, 'linear_test_top5')} | "
            f"{results['linear_test_loss']:.4f} |",
            "",
        ]
    ks = [k for k in settings.knn_ks if f"knn_k{k}_top1" in results]
    if ks:
        lines += [
            f"### Weighted kNN (T = {settings.knn_temperature:g}, final-norm CLS)",
            "",
            heading,
            "| k | top-1 | top-5 |",
            "|---|---|---|",
        ]
        lines += [
            f"| {k} | {_pct(results, f'knn_k{k}_top1')} | {_pct(results, f'knn_k{k}_top5')} |" for k in ks
        ]
        skipped = [k for k in settings.knn_ks if k not in ks]
        if skipped and "knn" in settings.evaluators:
            lines += ["", f"k = {skipped} not computed: larger than the training set."]
        lines.append("")
    shot_names = [name for name in fewshot.CLASSIFIERS if f"fewshot_{k_shot}shot_{name}" in results]
    if shot_names:
        lines += [
            f"### Few-shot ({k_shot}-shot, {settings.fewshot_n_query} queries per class, "
            f"{settings.fewshot_episodes} episodes, mean ± 95% CI)",
            "",
            heading,
            "| classifier | accuracy |",
            "|---|---|",
        ]
        lines += [f"| {name} | {_ci(results, f'fewshot_{k_shot}shot_{name}')} |" for name in shot_names]
        lines.append("")

    if transfer_names:
        knn_k = 20 if 20 in settings.knn_ks else settings.knn_ks[0]
        lines += [
            f"## Transfer (features of the backbone trained on {main_name})",
            "",
            heading,
            f"| dataset | kNN k={knn_k} top-1 | linear top-1 (best) | linear top-1 (final) | "
            f"{k_shot}-shot NCM | {k_shot}-shot logreg |",
            "|---|---|---|---|---|---|",
        ]
        for name in transfer_names:
            lines.append(
                f"| {name} | {_pct(results, f'{name}_knn_k{knn_k}_top1')} | "
                f"{_pct(results, f'{name}_linear_best_test_top1')} | "
                f"{_pct(results, f'{name}_linear_test_top1')} | "
                f"{_ci(results, f'{name}_fewshot_{k_shot}shot_ncm')} | "
                f"{_ci(results, f'{name}_fewshot_{k_shot}shot_logreg')} |"
            )
        lines.append("")
    return "\n".join(lines)


# The installed command (pyproject.toml's entry point) and its shim in a checkout.
CONSOLE_COMMAND = "dino-jax"
COMMAND_LINE_PROGRAMS = ("launch.py", CONSOLE_COMMAND)


def started_from_command_line() -> bool:
    """Whether this process is `dino-jax` or `python launch.py` (not a notebook or a script)."""
    return os.path.basename(sys.argv[0]) in COMMAND_LINE_PROGRAMS


def default_command() -> str:
    """The command line of this process, shell-quoted: `dino-jax ...` as typed for the installed
    command (whose sys.argv[0] is its full path), else `python ...`; in a notebook, which has no
    command line of its own, a pointer to the run's config.json."""
    if "ipykernel" in sys.modules:  # a Jupyter or Colab kernel: its command line says nothing of the run
        return "a notebook (the settings: config.json)"
    words = [shlex.quote(arg) for arg in sys.argv]
    if os.path.basename(sys.argv[0]) == CONSOLE_COMMAND:
        return " ".join([CONSOLE_COMMAND, *words[1:]])
    return " ".join(["python", *words])


def read_results(out_dir: str) -> dict[str, float]:
    """`out_dir/results.json` as a dict; empty when there is none yet."""
    path = os.path.join(out_dir, RESULTS_JSON)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def write_results(
    out_dir: str, results: Mapping[str, float], markdown: str | None = None
) -> tuple[str, str | None]:
    """Merges `results` into `out_dir/results.json` and, when given, writes `markdown` as
    `results.md`; returns both paths (None for a markdown not written). Writes are atomic. In a run
    of several processes only process 0 writes (the others return the same paths)."""
    from dino_jax import distributed

    if not distributed.is_primary():
        json_path = os.path.join(out_dir, RESULTS_JSON)
        return json_path, None if markdown is None else os.path.join(out_dir, RESULTS_MD)
    os.makedirs(out_dir, exist_ok=True)
    payload = read_results(out_dir)
    payload.update({key: float(value) for key, value in results.items()})
    json_path = os.path.join(out_dir, RESULTS_JSON)
    _write_atomically(json_path, json.dumps(payload, indent=2, sort_keys=True))
    if markdown is None:
        return json_path, None
    md_path = os.path.join(out_dir, RESULTS_MD)
    _write_atomically(md_path, markdown)
    return json_path, md_path


def _write_atomically(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text + "\n")
    os.replace(path + ".tmp", path)
