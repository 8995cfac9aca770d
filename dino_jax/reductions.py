"""Reductions whose fastest form depends on the backend."""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
