"""What happens between training steps: the console progress line, JSON-lines metrics, the
non-finite guard, the collapse warning and the attention panel. A periodic evaluation (a kNN
monitor) is one more `Hook` with `every_steps` and `on_state`.

A hook sees the host copy of every logged step's metrics (`on_metrics`), handed over one step late
by `DelayedMetrics` so the host never waits for the step it has just dispatched, and/or the train
state after every `every_steps`-th step (`on_state`).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Sequence

import jax
import numpy as np

from dino_jax.models import dino


def _print(*args):
    print(*args, file=sys.stderr, flush=True)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or inf; the run stops before saving a corrupt checkpoint."""


class Hook:
    """Work done between steps. `on_state(step, state)` runs after every step that is a multiple
    of `every_steps` (0: never); `on_metrics(step, metrics)` runs with the metrics of every logged
    step, as Python floats."""

    every_steps: int = 0

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def on_state(self, step: int, state) -> None:
        pass

    def close(self) -> None:
        pass


class DelayedMetrics:
    """Holds the device metrics of a logged step until the next step has been dispatched, then
    fetches them (the host sync) and hands them to the hooks, in order."""

    def __init__(self, hooks: Sequence[Hook]):
        self.hooks = hooks
        self.last: dict[str, float] = {}  # the latest metrics handed over
        self._pending: tuple[int, Any] | None = None

    def put(self, step: int, device_metrics) -> None:
        self._pending = (step, device_metrics)

    def flush(self) -> bool:
        """Hands the pending metrics to the hooks; False when none were pending."""
        if self._pending is None:
            return False
        step, device_metrics = self._pending
        self._pending = None
        self.last = fetch(device_metrics)
        for hook in self.hooks:
            hook.on_metrics(step, self.last)
        return True


def fetch(metrics) -> dict[str, float]:
    """Device metrics -> Python floats (this is the host sync; call it one step late)."""
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


# ---------------------------------------------------------------------------------------------
# Console and files.


class MetricsWriter:
    """Appends one JSON object per line to `<workdir>/metrics.jsonl`.

    `resumed_at`: the step a resumed run starts from. The rows of later steps, which the run that
    stopped wrote after its last checkpoint (and a last line cut short by a kill), are dropped
    first: the resumed run writes those steps again, so the file reads as one uninterrupted run.
    """

    def __init__(self, workdir: str, filename: str = "metrics.jsonl", *, resumed_at: int | None = None):
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


def _keep_rows_up_to(path: str, last_step: int) -> None:
    kept = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short
                continue
            if row["step"] <= last_step:
                kept.append(line if line.endswith("\n") else line + "\n")
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


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
    """The progress line, and the metrics (plus `images_per_s`) as a line of `metrics.jsonl`."""

    def __init__(self, workdir: str, *, total_steps: int, images_per_step: int, start_step: int):
        self.writer = MetricsWriter(workdir, resumed_at=start_step)
        self.progress = Progress(total_steps, images_per_step)
        self.progress.start(start_step)

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        metrics["images_per_s"] = self.progress.report(step, metrics)
        self.writer.write(step, metrics)

    def close(self) -> None:
        self.writer.close()


# ---------------------------------------------------------------------------------------------
# Guards.


def check_finite(step: int, metrics: dict[str, float]) -> None:
    if not math.isfinite(metrics["loss"]):
        raise NonFiniteLossError(
            f"loss is {metrics['loss']} at step {step}; stopping without saving this state. The last "
            "checkpoint in the workdir is intact. Lower train.lr, raise train.clip_grad's effect "
            "(smaller value) or use model.dtype=float32."
        )


class NonFiniteGuard(Hook):
    """Stops the run (NonFiniteLossError) at the first logged step whose loss is NaN or inf."""

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        check_finite(step, metrics)


def collapse_warning(metrics: dict[str, float], out_dim: int) -> str | None:
    """A message when the teacher's outputs have collapsed, else None. Uniform collapse: the loss
    sits at ln(out_dim) (11.09 for 65536 outputs) with uniform teacher outputs, the plateau users of
    the reference report on small or custom data; one-hot collapse: every image gets the same
    prototype."""
    uniform = math.log(out_dim)
    if (
        metrics.get("teacher_entropy", 0.0) > 0.98 * uniform
        and abs(metrics["loss"] - uniform) < 0.02 * uniform
    ):
        return (
            f"the loss ({metrics['loss']:.4f}) sits at ln(out_dim) = {uniform:.4f} and the teacher's "
            "outputs are uniform: uniform collapse, nothing is being learned. Known remedies: "
            "head.use_bn=True, a smaller head.out_dim, train.momentum_teacher closer to 1 for "
            "small batches, a lower train.teacher_temp (docs/results.md: the digits recipe)."
        )
    if metrics.get("teacher_batch_entropy", uniform) < 0.05 * uniform:
        return (
            "every image gets the same teacher prototype (batch entropy "
            f"{metrics['teacher_batch_entropy']:.3f}): one-hot collapse. Raise train.center_momentum "
            "or train.teacher_temp."
        )
    return None


class CollapseWarning(Hook):
    """Prints `collapse_warning`'s message once, from step `after_step` on (earlier, a loss near
    ln(out_dim) is just the start of training)."""

    def __init__(self, out_dim: int, *, after_step: int):
        self.out_dim, self.after_step = out_dim, after_step
        self.warned = False

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if self.warned or step < self.after_step:
            return
        message = collapse_warning(metrics, self.out_dim)
        if message:
            _print("WARNING: " + message)
            self.warned = True


# ---------------------------------------------------------------------------------------------
# Figures.


class AttentionPanel(Hook):
    """Every `every_steps` steps, the teacher's last-block CLS attention on a fixed batch of test
    images as `<workdir>/attention/step_<step>.png`, so a run's logs show what the heads attend to.

    `graphdef` is the DINO model's, `vit_graphdef` its backbone's (`models.dino.split_backbone`).
    """

    def __init__(
        self,
        workdir: str,
        graphdef,
        vit_graphdef,
        images_BxHxWx3: np.ndarray,
        *,
        every_steps: int,
        patch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
    ):
        from dino_jax.viz import attention  # matplotlib: loaded only when a panel is asked for

        self.every_steps = every_steps
        self.directory = os.path.join(workdir, "attention")
        self.graphdef, self.images, self.patch_size = graphdef, images_BxHxWx3, patch_size
        self.attention_fn = attention.make_cls_attention_fn(
            vit_graphdef, patch_size=patch_size, mean=mean, std=std
        )

    def on_state(self, step: int, state) -> None:
        from PIL import Image

        from dino_jax.viz import attention

        _, params = dino.split_backbone(self.graphdef, state.teacher)
        # Every process computes the panel (a collective computation on the global parameters).
        panel = attention.attention_panel(self.attention_fn, params, self.images, patch_size=self.patch_size)
        if jax.process_index() != 0:
            return
        os.makedirs(self.directory, exist_ok=True)
        Image.fromarray(panel).save(os.path.join(self.directory, f"step_{step:07d}.png"))
