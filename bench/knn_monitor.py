"""What the kNN monitor (eval.monitor_every_epochs) costs a training run, from the run's own logs.

    python launch.py --config=configs/digits.py --workdir=/tmp/m --config.eval.monitor_every_epochs=1
    python -m bench.knn_monitor /tmp/m [--every-epochs 1 2 4]

Reads `metrics.jsonl` and `config.json` of a workdir (finished or not). The loop's wall time is
the sum of the logged intervals (each row's steps x batch / images_per_s, which counts the
monitor's pauses, as the progress line does); the monitor's is the sum of its rows'
`monitor_seconds` (one call measures the teacher, and the student with eval.monitor_student).
Prints the measured share, and the share projected for other intervals from the median call and
the median step of the intervals without a monitor call and without the first (compiling) step:
`call / (call + interval_steps x step)`. The projection is what a short run (e.g. the CIFAR config
on a CPU, a few steps) can give; a whole run measures its share directly.
Last line: one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from dino_jax import config as config_lib, hooks
from dino_jax.data import sources


def monitor_cost(workdir: str, every_epochs: list[float]) -> dict[str, float]:
    config = config_lib.load_run_config(workdir)
    plan = config_lib.plan_steps(config, sources.DATASETS[config.dataset.name].num_train)
    rows = hooks.read_metrics(workdir)
    train_rows = [row for row in rows if "loss" in row]
    calls = [row for row in rows if "monitor_seconds" in row]
    if not train_rows or not calls:
        raise SystemExit(f"{workdir}: expected logged steps and kNN monitor rows in metrics.jsonl")
    call_steps = {row["step"] for row in calls}
    batch = config.train.batch_size
    loop_s, quiet_step_s, previous = 0.0, [], 0
    for row in train_rows:
        steps = row["step"] - previous
        interval_s = steps * batch / row["images_per_s"]
        loop_s += interval_s
        # An interval that ends with a monitor call, or holds one (or step 0's), or the compile.
        if previous > 0 and not any(previous <= step <= row["step"] for step in call_steps):
            quiet_step_s.append(interval_s / steps)
        previous = row["step"]
    monitor_s = sum(row["monitor_seconds"] for row in calls)
    call_s = float(np.median([row["monitor_seconds"] for row in calls]))
    step_s = float(np.median(quiet_step_s)) if quiet_step_s else float("nan")
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
        figures[f"projected_share_every_{epochs:g}_epochs"] = round(call_s / (call_s + interval_steps * step_s), 4)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir")
    parser.add_argument("--every-epochs", type=float, nargs="*", default=[0.5, 1, 2, 4])
    args = parser.parse_args()
    figures = monitor_cost(args.workdir, args.every_epochs)
    for key, value in figures.items():
        print(f"{key}: {value}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
