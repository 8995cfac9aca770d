"""Where a run's metrics go: the console progress line, `metrics.jsonl` (written, and read back by
the report, the notebooks and a resumed run) and TensorBoard event files."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import numpy as np

from dino_jax.hooks.base import Hook, StateResults

METRICS_FILE = "metrics.jsonl"


class MetricsWriter:
    """Appends one JSON object per line to `<workdir>/metrics.jsonl`: the metrics of a logged step
    (with `loss`), or what a hook measured at a step (the kNN monitor's `monitor_*` rows).

    `resumed_at`: the step a resumed run starts from. The rows of later steps, which the run that
    stopped wrote after its last checkpoint (and a last line cut short by a kill), are dropped
    first: the resumed run writes those steps again, so the file reads as one uninterrupted run.
    """

    def __init__(self, workdir: str, filename: str = METRICS_FILE, *, resumed_at: int | None = None):
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, filename)
        if resumed_at is not None and os.path.exists(self.path):
            _keep_rows_up_to(self.path, resumed_at)
        self._file = open(self.path, "a", buffering=1)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": int(step), **{k: _to_python(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")

    def close(self) -> None:
        self._file.close()


def _rows_with_lines(path: str):
    """`(row, line)` of each whole JSON line of `path`; a line cut short (a kill, or a run writing
    it right now) is skipped."""
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            yield row, line


def _keep_rows_up_to(path: str, last_step: int) -> None:
    kept = [
        line if line.endswith("\n") else line + "\n"
        for row, line in _rows_with_lines(path)
        if row["step"] <= last_step
    ]
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


def read_metrics(workdir: str, *, up_to_step: int | None = None) -> list[dict[str, Any]]:
    """The rows of `<workdir>/metrics.jsonl` (none if it is missing), up to `up_to_step`; readable
    while a run appends to it."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    return [row for row, _ in _rows_with_lines(path) if up_to_step is None or row["step"] <= up_to_step]


def _to_python(value):
    value = np.asarray(value)
    return value.item() if value.ndim == 0 else value.tolist()


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class Progress:
    """Prints `step 120/880 | loss 6.91 | lr 3.1e-04 | 85 img/s | ETA 9m02s` lines to stderr."""

    def __init__(self, total_steps: int, images_per_step: int, *, out=None):
        self.total_steps = total_steps
        self.images_per_step = images_per_step
        self.out = out or sys.stderr
        self._last_time: float | None = None
        self._last_step = 0

    def start(self, step: int) -> None:
        self._last_time, self._last_step = time.perf_counter(), step

    def report(self, step: int, metrics: dict[str, float]) -> float:
        """Prints one line; returns images/s since the last report."""
        now = time.perf_counter()
        elapsed = now - (self._last_time or now)
        steps = step - self._last_step
        images_per_s = steps * self.images_per_step / elapsed if elapsed > 0 and steps > 0 else 0.0
        eta = (self.total_steps - step) * elapsed / steps if steps > 0 else float("nan")
        self._last_time, self._last_step = now, step
        eta_text = format_duration(eta) if math.isfinite(eta) else "?"
        print(
            f"step {step}/{self.total_steps} | loss {metrics['loss']:.4f} | lr {metrics['lr']:.2e} | "
            f"{images_per_s:.0f} img/s | ETA {eta_text}",
            file=self.out,
            flush=True,
        )
        return images_per_s


class LogMetrics(Hook):
    """The progress line, and with `jsonl` the metrics (plus `images_per_s`) as a line of
    `metrics.jsonl`, and the numbers of `on_results` as a line of their own."""

    def __init__(
        self, workdir: str, *, total_steps: int, images_per_step: int, start_step: int, jsonl: bool = True
    ):
        self.writer = MetricsWriter(workdir, resumed_at=start_step) if jsonl else None
        self.progress = Progress(total_steps, images_per_step)
        self.progress.start(start_step)

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        metrics["images_per_s"] = self.progress.report(step, metrics)
        if self.writer:
            self.writer.write(step, metrics)

    def on_results(self, step: int, results: StateResults) -> None:
        if self.writer and results.scalars:
            self.writer.write(step, results.scalars)

    def close(self) -> None:
        if self.writer:
            self.writer.close()


def tensorboard_tag(name: str) -> str:
    """The TensorBoard tag of a metric: the kNN monitor's under `knn/`, the step's under `train/`,
    so each group gets a section of its own."""
    if name.startswith("monitor_"):
        return "knn/" + name[len("monitor_") :]
    return name if "/" in name else "train/" + name


class TensorBoardLog(Hook):
    """Event files in `logdir` (the workdir, beside metrics.jsonl), written by tensorboardX: every
    logged step's metrics and the numbers of `on_results` as scalars, its pictures as images, so
    `tensorboard --logdir runs/` shows a run while it trains. A resumed run first drops the events
    after its start step (`purge_step`), as `LogMetrics` drops those rows."""

    def __init__(self, logdir: str, *, start_step: int, flush_secs: int = 20):
        from tensorboardX import SummaryWriter  # only where TensorBoard logging is asked for

        self.writer = SummaryWriter(
            logdir=logdir, purge_step=start_step + 1 if start_step else None, flush_secs=flush_secs
        )

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(tensorboard_tag(name), value, step)

    def on_results(self, step: int, results: StateResults) -> None:
        self.on_metrics(step, results.scalars)
        for name, image in results.images.items():
            self.writer.add_image(name, image, step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()
