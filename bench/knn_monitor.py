"""What the kNN monitor (eval.monitor_every_epochs) costs a training run, from the run's own logs.

    python launch.py --config=configs/digits.py --workdir=/tmp/m --config.eval.monitor_every_epochs=1
    python -m bench.knn_monitor /tmp/m [--every-epochs 1 2 4]

Reads `metrics.jsonl` and `config.json` of a workdir (finished or not). The loop's wall time is
the sum of the logged intervals (each row's steps x batch / images_per_s, which counts the
monitor's pauses, as the progress line does); the monitor's is the sum of its rows'
`monitor_seconds` (one call measures the teacher, and the student with eval.monitor_student).
Prints the measured share, and the share projected for other intervals from the median call and
the median step (of each logged interval but the first, which compiles, less its monitor calls):
`call / (call + interval_steps x step)`. The projection is what a short run (e.g. the CIFAR config
on a CPU, a few steps) can give; a whole run measures its share directly.

`--recipe NAME` (a recipe of dino_jax/configs/) also projects the share for that recipe's own batch
and monitor subsets from a run scaled down to fit a slow machine (a smaller batch and fewer monitor
images, same model and crops): the call scales with the monitor's images (a forward pass each; the
kNN itself is a small matrix product), the step with the batch, and the interval is in the
recipe's steps per epoch. Both scalings are linear, which holds where the machine is saturated by
either size (a CPU); on a GPU measure the recipe itself.
Last line: one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import importlib
import json

import numpy as np

from dino_jax import config as config_lib
from dino_jax.hooks import metrics_log
from dino_jax.data import sources


def monitor_images(config) -> int:
    """The images one monitor call embeds: its train and test subsets, capped at the splits."""
    dataset = sources.DATASETS[config.dataset.name]
    return min(dataset.num_train, config.eval.monitor_train_images) + min(
        dataset.num_eval, config.eval.monitor_test_images
    )


def monitor_cost(workdir: str, every_epochs: list[float], recipe: str | None = None) -> dict[str, float]:
    config = config_lib.load_run_config(workdir)
    plan = config_lib.plan_steps(config, sources.DATASETS[config.dataset.name].num_train)
    rows = metrics_log.read_metrics(workdir)
    train_rows = [row for row in rows if "loss" in row]
    calls = [row for row in rows if "monitor_seconds" in row]
    if not train_rows or not calls:
        raise SystemExit(f"{workdir}: expected logged steps and kNN monitor rows in metrics.jsonl")
    batch = config.train.batch_size
    loop_s, step_s_of_intervals, previous = 0.0, [], 0
    for row in train_rows:
        steps = row["step"] - previous
        interval_s = steps * batch / row["images_per_s"]
        loop_s += interval_s
        # A row is logged after the monitor call at its own step: the interval (previous, step]
        # holds the calls there. The first interval also holds step 0's call and the compile.
        if previous > 0:
            paused_s = sum(c["monitor_seconds"] for c in calls if previous < c["step"] <= row["step"])
            step_s_of_intervals.append((interval_s - paused_s) / steps)
        previous = row["step"]
    monitor_s = sum(row["monitor_seconds"] for row in calls)
    call_s = float(np.median([row["monitor_seconds"] for row in calls]))
    step_s = float(np.median(step_s_of_intervals)) if step_s_of_intervals else float("nan")
    figures = {
        "config": config.dataset.name + (" (synthetic)" if config.dataset.synthetic else ""),
        "steps_logged": train_rows[-1]["step"],
        "steps_per_epoch": plan.steps_per_epoch,
        "batch": batch,
        "monitor_calls": len(calls),
        "monitor_student": bool(config.eval.monitor_student),
        "monitor_s": round(monitor_s, 2),
        "loop_s": round(loop_s, 2),
        "measured_share": round(monitor_s / loop_s, 4),
        "median_call_s": round(call_s, 3),
        "median_step_s": round(step_s, 4),
    }
    for epochs in every_epochs:
        interval_steps = max(1, round(epochs * plan.steps_per_epoch))
        figures[f"projected_share_every_{epochs:g}_epochs"] = round(
            call_s / (call_s + interval_steps * step_s), 4
        )
    if recipe:
        full = importlib.import_module(f"dino_jax.configs.{recipe}").get_config(None)
        full_plan = config_lib.plan_steps(full, sources.DATASETS[full.dataset.name].num_train)
        full_call_s = call_s * monitor_images(full) / monitor_images(config)
        full_step_s = step_s * full.train.batch_size / batch
        figures.update(
            recipe=recipe,
            recipe_batch=full.train.batch_size,
            recipe_monitor_images=monitor_images(full),
            recipe_steps_per_epoch=full_plan.steps_per_epoch,
            recipe_call_s=round(full_call_s, 1),
            recipe_step_s=round(full_step_s, 3),
        )
        for epochs in every_epochs:
            steps = max(1, round(epochs * full_plan.steps_per_epoch))
            share = full_call_s / (full_call_s + steps * full_step_s)
            figures[f"recipe_projected_share_every_{epochs:g}_epochs"] = round(share, 4)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir")
    parser.add_argument("--every-epochs", type=float, nargs="*", default=[0.5, 1, 2, 4])
    parser.add_argument("--recipe", help="project to this recipe's batch and monitor subsets (cifar100)")
    args = parser.parse_args()
    figures = monitor_cost(args.workdir, args.every_epochs, args.recipe)
    for key, value in figures.items():
        print(f"{key}: {value}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
