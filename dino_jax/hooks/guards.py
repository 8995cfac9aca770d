"""Hooks that watch a run for failure: a non-finite loss stops it (before a checkpoint of the bad
state is written), a collapse of the teacher's outputs or of the kNN monitor's accuracy is warned
of once."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

from dino_jax import loss_scale
from dino_jax.hooks.base import Hook, StateResults


def _print(*args):
    print(*args, file=sys.stderr, flush=True)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or inf; the run stops before saving a corrupt checkpoint."""


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
