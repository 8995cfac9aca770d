"""What a run tells its user: a console progress line, JSON-lines metrics, a non-finite guard,
and a collapse warning.

The training loop hands over step t's metrics (still on device) and fetches step t-1's here, so
the host never waits for the step it has just dispatched.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import jax
import numpy as np


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or inf; the run stops before saving a corrupt checkpoint."""


class MetricsWriter:
    """Appends one JSON object per line to `<workdir>/metrics.jsonl`."""

    def __init__(self, workdir: str, filename: str = "metrics.jsonl"):
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, filename)
        self._file = open(self.path, "a", buffering=1)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": int(step), **{k: _to_python(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")

    def close(self) -> None:
        self._file.close()


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


def fetch(metrics) -> dict[str, float]:
    """Device metrics -> Python floats (this is the host sync; call it one step late)."""
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def check_finite(step: int, metrics: dict[str, float]) -> None:
    if not math.isfinite(metrics["loss"]):
        raise NonFiniteLossError(
            f"loss is {metrics['loss']} at step {step}; stopping without saving this state. The last "
            "checkpoint in the workdir is intact. Lower train.lr, raise train.clip_grad's effect "
            "(smaller value) or use model.dtype=float32."
        )


def collapse_warning(metrics: dict[str, float], out_dim: int) -> str | None:
    """A message when the teacher's outputs have collapsed (REFERENCE.md §5), else None."""
    uniform = math.log(out_dim)
    if (
        metrics.get("teacher_entropy", 0.0) > 0.98 * uniform
        and abs(metrics["loss"] - uniform) < 0.02 * uniform
    ):
        return (
            f"the loss ({metrics['loss']:.4f}) sits at ln(out_dim) = {uniform:.4f} and the teacher's "
            "outputs are uniform: uniform collapse, nothing is being learned. Known remedies: "
            "head.use_bn=True, a smaller head.out_dim, train.momentum_teacher closer to 1 for "
            "small batches, a lower train.teacher_temp (FINDINGS.md)."
        )
    if metrics.get("teacher_batch_entropy", uniform) < 0.05 * uniform:
        return (
            "every image gets the same teacher prototype (batch entropy "
            f"{metrics['teacher_batch_entropy']:.3f}): one-hot collapse. Raise train.center_momentum "
            "or train.teacher_temp."
        )
    return None
