"""Dynamic loss scaling for float16 compute (T4-class GPUs have no bfloat16).

float16 keeps 5 exponent bits: gradients below ~6e-8 flush to zero. The loss is multiplied by a
scale before differentiation and the gradients divided by it after; a step whose gradients are not
all finite is skipped and the scale halved, and after `period` finite steps in a row it doubles.
These are the defaults of PyTorch's `GradScaler` (start 2**16, factor 2, period 2000), which the
reference uses for its float16 runs.

Written here rather than taken from `jmp` (its last release, 0.0.4, is from 2023, and it would be
one more wheel to carry onto accelerator images) for a state of two scalars that the train step
and the checkpoints see as an ordinary pytree.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

INITIAL_SCALE = 2.0**16
GROWTH_PERIOD = 2000  # finite steps in a row before the scale doubles
MIN_SCALE = 1.0


class LossScale(NamedTuple):
    scale: jax.Array  # float32 scalar
    good_steps: jax.Array  # int32 scalar: finite steps since the scale last changed


def initial(compute_dtype: str) -> LossScale | None:
    """The starting state for `compute_dtype`; None where no scaling is needed (float32 and
    bfloat16, whose exponent range is float32's)."""
    if compute_dtype != "float16":
        return None
    return LossScale(scale=jnp.asarray(INITIAL_SCALE, jnp.float32), good_steps=jnp.zeros([], jnp.int32))


def all_finite(tree) -> jax.Array:
    """One boolean: every element of every leaf is finite."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.stack(leaves).all() if leaves else jnp.asarray(True)


def unscale(loss_scale: LossScale, grads):
    inverse = 1.0 / loss_scale.scale
    return jax.tree.map(lambda g: (g.astype(jnp.float32) * inverse).astype(g.dtype), grads)


def adjust(loss_scale: LossScale, finite: jax.Array) -> LossScale:
    """Halve on a non-finite step (not below MIN_SCALE); double after GROWTH_PERIOD finite ones."""
    grown = loss_scale.good_steps + 1 >= GROWTH_PERIOD
    scale = jnp.where(
        finite,
        jnp.where(grown, loss_scale.scale * 2.0, loss_scale.scale),
        jnp.maximum(loss_scale.scale * 0.5, MIN_SCALE),
    )
    good_steps = jnp.where(finite & ~grown, loss_scale.good_steps + 1, 0)
    return LossScale(scale=scale.astype(jnp.float32), good_steps=good_steps.astype(jnp.int32))
