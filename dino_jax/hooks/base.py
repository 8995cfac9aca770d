"""A hook: work done between training steps, and how the loop hands it the step's metrics and
the train state.

A hook sees the host copy of every logged step's metrics (`on_metrics`), handed over one step late
by `DelayedMetrics` so the host never waits for the step it has just dispatched, and/or the train
state after every `every_steps`-th step (`on_state`). What `on_state` measures (`StateResults`:
the kNN monitor's accuracies, the attention panel's image) is handed to every hook's `on_results`,
so the writers (`metrics_log.py`) log it like the step's metrics.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np


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
