"""Per-iteration schedules of the reference (`utils.cosine_scheduler`; docs/reference.md), as
numpy tables.

The reference precomputes every schedule as a table indexed by the global iteration; we do the
same so that the values are identical to float precision (a closed form in float32 would drift
from the float64 table by a few ulps near the cosine's ends). Tables are small: one float per step.
"""

from __future__ import annotations

import dataclasses

import numpy as np


def cosine_schedule(
    base_value: float,
    final_value: float,
    epochs: int,
    steps_per_epoch: int,
    warmup_epochs: int = 0,
    start_warmup_value: float = 0.0,
) -> np.ndarray:
    """The reference's `utils.cosine_scheduler`: linear warm-up then a cosine to `final_value`.

    Returns `epochs * steps_per_epoch` values. The warm-up is `linspace(start, base, W)` including
    both ends, so the peak appears at the last warm-up step and again at the first cosine step; the
    last value is slightly above `final_value`, as in the reference.
    """
    if epochs <= 0 or steps_per_epoch <= 0:
        raise ValueError(
            f"a schedule needs epochs > 0 and steps_per_epoch > 0, got {epochs}, {steps_per_epoch}"
        )
    warmup_steps = warmup_epochs * steps_per_epoch
    total_steps = epochs * steps_per_epoch
    if warmup_steps > total_steps:
        raise ValueError(f"warm-up of {warmup_epochs} epochs is longer than the {epochs}-epoch run")
    warmup = np.linspace(start_warmup_value, base_value, warmup_steps) if warmup_steps > 0 else np.zeros(0)
    iters = np.arange(total_steps - warmup_steps)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate([warmup, cosine])


def teacher_temperature_schedule(
    warmup_temperature: float, temperature: float, warmup_epochs: int, epochs: int
) -> np.ndarray:
    """Per-epoch teacher temperature: linspace warm-up (both ends included), then constant."""
    if warmup_epochs > epochs:
        raise ValueError(f"teacher temperature warm-up of {warmup_epochs} epochs exceeds {epochs} epochs")
    return np.concatenate(
        [
            np.linspace(warmup_temperature, temperature, warmup_epochs),
            np.full(epochs - warmup_epochs, temperature),
        ]
    )


@dataclasses.dataclass(frozen=True)
class Schedules:
    """All the tables one run needs; `lr` and `weight_decay` and `momentum` are per step."""

    lr: np.ndarray
    weight_decay: np.ndarray
    momentum: np.ndarray
    teacher_temperature: np.ndarray  # per epoch
    steps_per_epoch: int


def build_schedules(
    *,
    lr: float,
    min_lr: float,
    warmup_epochs: int,
    weight_decay: float,
    weight_decay_end: float,
    momentum_teacher: float,
    warmup_teacher_temp: float,
    teacher_temp: float,
    warmup_teacher_temp_epochs: int,
    epochs: int,
    steps_per_epoch: int,
) -> Schedules:
    """Builds the reference's four schedules. `lr` is the peak already scaled to the batch size."""
    return Schedules(
        lr=cosine_schedule(lr, min_lr, epochs, steps_per_epoch, warmup_epochs),
        weight_decay=cosine_schedule(weight_decay, weight_decay_end, epochs, steps_per_epoch),
        momentum=cosine_schedule(momentum_teacher, 1.0, epochs, steps_per_epoch),
        teacher_temperature=teacher_temperature_schedule(
            warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, epochs
        ),
        steps_per_epoch=steps_per_epoch,
    )


def lookup(table: np.ndarray, index):
    """`table[index]` under jit, clamped to the last entry (so a step past the end is safe)."""
    import jax.numpy as jnp

    return jnp.asarray(table, dtype=jnp.float32)[jnp.minimum(index, len(table) - 1)]
