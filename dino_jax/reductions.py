"""Reductions whose fastest form depends on the backend."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def _sum_as_dot(x_NxK: jax.Array) -> jax.Array:
    return jnp.dot(jnp.ones((1, x_NxK.shape[0]), x_NxK.dtype), x_NxK, preferred_element_type=x_NxK.dtype)


def _sum_as_reduce(x_NxK: jax.Array) -> jax.Array:
    return jnp.sum(x_NxK, axis=0, keepdims=True)


def _row_sum_as_dot(x_NxK: jax.Array) -> jax.Array:
    return jnp.dot(x_NxK, jnp.ones((x_NxK.shape[-1], 1), x_NxK.dtype), preferred_element_type=x_NxK.dtype)


def _row_sum_as_reduce(x_NxK: jax.Array) -> jax.Array:
    return jnp.sum(x_NxK, axis=-1, keepdims=True)


def column_sum(x_NxK: jax.Array) -> jax.Array:
    """`sum(x, axis=0, keepdims=True)`, (1, K), the same up to float32 rounding on every backend.

    On the CPU backend it is computed as the product `ones(1, N) @ x`: XLA:CPU's YNNPACK reduction
    of a few rows of a very wide array is slow (a 256 x 65536 column sum, the weight-normalised
    last layer's, took ~0.4 s against ~0.07 s as a product on the 2-core CPU of
    docs/benchmarks.md; a 128 x 65536 mean 0.25 s against 2 ms). Elsewhere it stays a reduction
    (`lax.platform_dependent`, resolved when lowering).
    """
    return jax.lax.platform_dependent(x_NxK, cpu=_sum_as_dot, default=_sum_as_reduce)


def column_mean(x_NxK: jax.Array) -> jax.Array:
    """`mean(x, axis=0, keepdims=True)`, (1, K): `column_sum` / N."""
    return column_sum(x_NxK) / x_NxK.shape[0]


def column_norm(x_NxK: jax.Array) -> jax.Array:
    """L2 norm of each column, (1, K): `jnp.linalg.norm(x, axis=0, keepdims=True)`."""
    return jnp.sqrt(column_sum(jnp.square(x_NxK)))


def row_sum(x_NxK: jax.Array) -> jax.Array:
    """`sum(x, axis=-1, keepdims=True)`, (..., 1); on the CPU backend the product `x @ ones(K, 1)`.

    For the 65,536-wide head: XLA:CPU's YNNPACK reduction fusions evaluate the transcendental
    function they absorb (the exp of a softmax, the log of an entropy) far slower than a loop fusion
    does; a sum of exp over 640 x 65536 logits took 113-131 ms against 68-77 ms for the same exp
    feeding a product (docs/benchmarks.md).
    """
    return jax.lax.platform_dependent(x_NxK, cpu=_row_sum_as_dot, default=_row_sum_as_reduce)


def logsumexp(x_NxK: jax.Array) -> jax.Array:
    """`log(sum(exp(x), axis=-1, keepdims=True))`, shifted by the row max, the sum as `row_sum`."""
    row_max = jax.lax.stop_gradient(jnp.max(x_NxK, axis=-1, keepdims=True))
    return row_max + jnp.log(row_sum(jnp.exp(x_NxK - row_max)))


def softmax(x_NxK: jax.Array) -> jax.Array:
    """`jax.nn.softmax(x, axis=-1)` with its normaliser summed as `row_sum`."""
    unnormalised = jnp.exp(x_NxK - jax.lax.stop_gradient(jnp.max(x_NxK, axis=-1, keepdims=True)))
    return unnormalised / row_sum(unnormalised)


# The lowest finite float32 starts the running max: an empty partial (the reduce's initial value)
# then weighs exp(lowest - max) = 0 against any element, and never takes exp(nan).
_LOWEST = float(jnp.finfo(jnp.float32).min)


def softmax_statistics_one_pass(
    x_NxK: jax.Array, *, entropy: bool = False, plain: Sequence[jax.Array] = ()
) -> tuple[jax.Array, jax.Array | None, list[jax.Array]]:
    """`(logsumexp, entropy of softmax(x) if asked, [sum(p) for p in plain])` over the last axis
    from a single read of `x`, each (..., 1) float32; each `plain` array broadcasts against x.

    For GPUs: XLA computes a softmax's max and its sum of exponentials as two reductions, each
    reading the whole (..., K) input (the student's 2560 x 65536 logits are 335 MB a read in
    float16), and an entropy or a weighted sum is a third. Here they are one variadic reduce, the
    "online softmax" recurrence: partial results carry their max m, and combine by rescaling the
    one with the smaller max by exp(-d), d the difference of the maxima.

    Precision: a partial carries `sum(exp(x - m))` less the 1 of its max element, `z'`, and the
    entropy's `sum(exp(x - m) (m - x))`, `b'`, both sums of non-negative terms; so the small terms
    of a peaked row add up among themselves instead of vanishing into the max's 1 (a softmax with
    tail mass 1e-5 lost it all in a sequential sum of `exp(x - m)`). `logsumexp = m + log1p(z')`,
    `entropy = log1p(z') + b' / (1 + z')`.

    Not differentiable (the variadic reduce has no JVP): for forward passes whose gradient is
    written out, or under `stop_gradient`.
    """
    x = x_NxK.astype(jnp.float32)
    tails = [jnp.zeros_like(x)] * (2 if entropy else 1)  # z' (and b') of a single element: 0
    summed = [jnp.broadcast_to(p.astype(jnp.float32), x.shape) for p in plain]

    def combine(left, right):
        max_l, max_r = left[0], right[0]
        left_is_larger = max_l >= max_r
        # Equal maxima (two elements at -inf included, whose difference is nan) are 0 apart.
        gap = jnp.where(max_l == max_r, 0.0, jnp.abs(max_l - max_r))
        scale = jnp.exp(-gap)
        tail_big, tail_small = (
            jnp.where(left_is_larger, left[1], right[1]),
            jnp.where(left_is_larger, right[1], left[1]),
        )
        combined = [jnp.maximum(max_l, max_r), tail_big + (1.0 + tail_small) * scale]
        if entropy:
            entropy_big = jnp.where(left_is_larger, left[2], right[2])
            entropy_small = jnp.where(left_is_larger, right[2], left[2])
            # An element of the smaller partial sits gap further below the larger max. A gap of
            # inf (an element at -inf) weighs 0, not inf * 0.
            moved = jnp.where(scale > 0, (entropy_small + gap * (1.0 + tail_small)) * scale, 0.0)
            combined.append(entropy_big + moved)
        split = 1 + len(tails)
        return (*combined, *(l + r for l, r in zip(left[split:], right[split:])))

    operands = (x, *tails, *summed)
    inits = tuple(np.float32(init) for init in (_LOWEST,) + (0.0,) * (len(operands) - 1))
    results = [r[..., None] for r in jax.lax.reduce(operands, inits, combine, (x.ndim - 1,))]
    row_max, tail_sum = results[0], results[1]
    log1p_tail = jnp.log1p(tail_sum)
    row_entropy = log1p_tail + results[2] / (1.0 + tail_sum) if entropy else None
    return row_max + log1p_tail, row_entropy, results[1 + len(tails) :]
