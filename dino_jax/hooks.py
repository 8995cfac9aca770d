"""What happens between training steps: the console progress line, JSON-lines metrics,
TensorBoard event files, the non-finite guard, the collapse warning, the kNN monitor and the
attention panel.

A hook sees the host copy of every logged step's metrics (`on_metrics`), handed over one step late
by `DelayedMetrics` so the host never waits for the step it has just dispatched, and/or the train
state after every `every_steps`-th step (`on_state`). What `on_state` measures (`StateResults`:
the kNN monitor's accuracies, the attention panel's image) is handed to every hook's `on_results`,
so the writers log it like the step's metrics.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from dino_jax import loss_scale
from dino_jax.models import dino


def _print(*args):
    print(*args, file=sys.stderr, flush=True)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or inf; the run stops before saving a corrupt checkpoint."""


@dataclasses.dataclass(frozen=True)
class StateResults:
    """What a hook measured on the train state at a step: numbers (`scalars`, logged as a row of
    their own) and uint8 `(H, W, 3)` pictures (`images`), each under its name."""

    scalars: dict[str, float] = dataclasses.field(default_factory=dict)
    images: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


class Hook:
    """Work done between steps. `on_state(step, state)` runs after every step that is a multiple
    of `every_steps` (0: never), and once before the first step of a run that starts at step 0;
    what it returns goes to every hook's `on_results(step, results)`. `on_metrics(step, metrics)`
    runs with the metrics of every logged step, as Python floats."""

    every_steps: int = 0

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def on_state(self, step: int, state) -> StateResults | None:
        return None

    def on_results(self, step: int, results: StateResults) -> None:
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
        self.last = with_derived_metrics(fetch(device_metrics))
        for hook in self.hooks:
            hook.on_metrics(step, self.last)
        return True

    def run_state_hooks(self, step: int, state, *, every: bool = False) -> None:
        """Runs `on_state` of the hooks due at `step` (all hooks with an interval when `every`) and
        hands what they return to every hook's `on_results`."""
        for hook in self.hooks:
            if hook.every_steps and (every or step % hook.every_steps == 0):
                results = hook.on_state(step, state)
                if results is not None:
                    for receiver in self.hooks:
                        receiver.on_results(step, results)


def fetch(metrics) -> dict[str, float]:
    """Device metrics -> Python floats (this is the host sync; call it one step late)."""
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def with_derived_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """`metrics` plus `teacher_student_kl`, the mean KL divergence from the teacher's to the
    student's distributions over the loss's view pairs: the loss is their cross-entropy, and every
    teacher view enters the same number of pairs, so the loss minus the teacher's mean entropy is
    exactly that KL (the DINO paper's decomposition; it goes to 0 when the student matches)."""
    if "loss" in metrics and "teacher_entropy" in metrics:
        metrics["teacher_student_kl"] = metrics["loss"] - metrics["teacher_entropy"]
    return metrics


# ---------------------------------------------------------------------------------------------
# Console and files.


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


# ---------------------------------------------------------------------------------------------
# Guards.


def check_finite(step: int, metrics: dict[str, float]) -> None:
    """Raises NonFiniteLossError for a non-finite loss, except on a float16 step the loss scaling
    skipped while it can still lower the scale (nothing was applied; the next steps retry)."""
    if math.isfinite(metrics["loss"]):
        return
    if metrics.get("skipped_step") and metrics.get("loss_scale", loss_scale.MIN_SCALE) > loss_scale.MIN_SCALE:
        return
    if "loss_scale" in metrics:
        raise NonFiniteLossError(
            f"loss is {metrics['loss']} at step {step} under float16 with the loss scale at its minimum "
            f"({loss_scale.MIN_SCALE:g}): the forward pass itself overflows float16, which scaling cannot "
            "fix. The last checkpoint in the workdir is intact. Use model.dtype=bfloat16 where the "
            "accelerator has it (A100, H100, TPU), or float32."
        )
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


def knn_collapse_warning(
    points: Sequence[tuple[int, float]], *, num_test: int, falling_after: int, no_better_after: int
) -> str | None:
    """A message when the kNN monitor says the features are getting worse or are no better than the
    untrained network's, else None. `points` are `(step, teacher kNN top-1 %)` in step order, the
    first at step 0 (the untrained network) where the run started there; `num_test` images were
    classified. Each check looks at the last two points, so one noisy point warns of nothing:
    - falling: both below the best point since `falling_after` by more than max(3, 2 standard
      errors) points;
    - no better: both from `no_better_after` on and within one standard error of step 0's.
    Early in training the teacher's kNN often dips below the untrained network's before it rises
    (digits: 62.8% untrained, 52.5% at step 66, 88.3% at the end), hence the two thresholds. A run
    can also look healthy in its loss, then collapse: the digits-like runs of the reference did.
    """
    if len(points) < 3:
        return None
    (_, previous), (step, latest) = points[-2:]

    def standard_error(percent: float) -> float:
        p = min(max(percent / 100, 0.01), 0.99)
        return 100 * math.sqrt(p * (1 - p) / max(num_test, 1))

    remedies = (
        "Known remedies: head.use_bn=True, a smaller head.out_dim, a lower train.lr, "
        "train.momentum_teacher closer to 1 (docs/results.md: the digits recipe)"
    )
    earlier = [point for point in points[:-2] if point[0] >= falling_after]
    if earlier:
        best_step, best = max(earlier, key=lambda point: point[1])
        if max(previous, latest) < best - max(3.0, 2 * standard_error(best)):
            return (
                f"the teacher's kNN accuracy fell from {best:.1f}% (step {best_step}) to {latest:.1f}% "
                f"(step {step}) on the monitor's {num_test} test images: the features are getting "
                f"worse, a collapse the loss may not show yet. The checkpoints keep only the latest "
                f"steps: copy one now if you want it. {remedies}."
            )
    if points[-2][0] < no_better_after:
        return None
    start_step, untrained = points[0]
    if start_step == 0 and max(previous, latest) <= untrained + standard_error(untrained):
        return (
            f"after {step} steps the teacher's kNN accuracy ({latest:.1f}%) is no better than the "
            f"untrained network's ({untrained:.1f}%) on the monitor's {num_test} test images: "
            f"nothing useful is being learned. {remedies}."
        )
    return None


class CollapseWarning(Hook):
    """Prints `collapse_warning`'s message once, from step `after_step` on (earlier, a loss near
    ln(out_dim) is just the start of training), and with a kNN monitor `knn_collapse_warning`'s
    once (`knn_after_steps`: its `falling_after` and `no_better_after`). `knn_key` names the
    monitor's teacher accuracy, `knn_points` holds the points a resumed run logged before it
    started."""

    def __init__(
        self,
        out_dim: int,
        *,
        after_step: int,
        knn_key: str | None = None,
        knn_points: Sequence[tuple[int, float]] = (),
        knn_test_images: int = 0,
        knn_after_steps: tuple[int, int] = (0, 0),
    ):
        self.out_dim, self.after_step = out_dim, after_step
        self.knn_key, self.knn_test_images, self.knn_after_steps = knn_key, knn_test_images, knn_after_steps
        self.knn_points = list(knn_points)
        self.warned = False
        self.warned_knn = False

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if self.warned or step < self.after_step:
            return
        message = collapse_warning(metrics, self.out_dim)
        if message:
            _print("WARNING: " + message)
            self.warned = True

    def on_results(self, step: int, results: StateResults) -> None:
        if self.knn_key not in results.scalars:
            return
        self.knn_points.append((step, results.scalars[self.knn_key]))
        if self.warned_knn:
            return
        falling_after, no_better_after = self.knn_after_steps
        message = knn_collapse_warning(
            self.knn_points,
            num_test=self.knn_test_images,
            falling_after=falling_after,
            no_better_after=no_better_after,
        )
        if message:
            _print("WARNING: " + message)
            self.warned_knn = True


class KnnMonitor(Hook):
    """Every `every_steps` steps (and before the first), the weighted kNN top-1/top-5 of the
    teacher's backbone (and the student's) on the monitor's fixed subsets, as
    `monitor_{teacher,student}_knn_k{k}_top{1,5}` (percent) with `monitor_seconds`, and a console
    line. `knn_fn(vit_graphdef, vit_params) -> {"knn_k{k}_top1": ...}` runs the evaluation
    (`evaluation.knn` on `evaluation.monitor_data`: `num_train` neighbours, `num_test` queries);
    `graphdef` is the DINO model's; `untrained` the teacher's accuracy at step 0, if known (a
    resumed run's)."""

    def __init__(
        self,
        graphdef,
        knn_fn: Callable[[Any, Any], dict[str, float]],
        *,
        every_steps: int,
        k: int,
        num_train: int,
        num_test: int,
        networks: Sequence[str] = ("teacher",),
        untrained: float | None = None,
    ):
        self.graphdef, self.knn_fn, self.every_steps, self.k = graphdef, knn_fn, every_steps, k
        self.num_train, self.num_test = num_train, num_test
        self.networks, self.untrained = tuple(networks), untrained

    def key(self, network: str, top: int = 1) -> str:
        return f"monitor_{network}_knn_k{self.k}_top{top}"

    def on_state(self, step: int, state) -> StateResults:
        # The steps dispatched since the last fetched metrics may still be computing: they finish
        # before the clock starts, so `monitor_seconds` is the monitor's own time, not theirs.
        jax.block_until_ready([getattr(state, network) for network in self.networks])
        started = time.perf_counter()
        scalars = {}
        for network in self.networks:
            vit_graphdef, params = dino.split_backbone(self.graphdef, getattr(state, network))
            knn = self.knn_fn(vit_graphdef, params)
            for top in (1, 5):
                scalars[self.key(network, top)] = knn[f"knn_k{self.k}_top{top}"]
        scalars["monitor_seconds"] = time.perf_counter() - started
        if step == 0:
            self.untrained = scalars[self.key("teacher")]
        accuracies = ", ".join(f"{network} {scalars[self.key(network)]:.2f}%" for network in self.networks)
        before = f" (untrained {self.untrained:.2f}%)" if self.untrained is not None and step else ""
        if jax.process_index() == 0:
            _print(
                f"kNN monitor at step {step}: k={self.k} top-1 {accuracies}{before} on {self.num_train} "
                f"train / {self.num_test} test images, {scalars['monitor_seconds']:.1f} s"
            )
        return StateResults(scalars)


# ---------------------------------------------------------------------------------------------
# Figures.


class AttentionPanel(Hook):
    """Every `every_steps` steps, the teacher's last-block CLS attention on a fixed batch of test
    images as `<workdir>/attention/step_<step>.png` (and the writers' `attention/teacher` image),
    so a run's logs show what the heads attend to.

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

    def on_state(self, step: int, state) -> StateResults:
        from PIL import Image

        from dino_jax.viz import attention

        _, params = dino.split_backbone(self.graphdef, state.teacher)
        # Every process computes the panel (a collective computation on the global parameters).
        panel = attention.attention_panel(self.attention_fn, params, self.images, patch_size=self.patch_size)
        if jax.process_index() != 0:
            return
        os.makedirs(self.directory, exist_ok=True)
        Image.fromarray(panel).save(os.path.join(self.directory, f"step_{step:07d}.png"))
        return StateResults(images={"attention/teacher": panel})
