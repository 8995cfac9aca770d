"""The ViT's building blocks that match the reference's: its initialisers, token-wise Linear and
LayerNorm layers (parameters float32, products in the compute dtype).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from dino_jax.models.fused_grads import LayerNorm


def normal_init(stddev: float):
    # The reference's trunc_normal_ cuts at +-2 in absolute units, i.e. +-100 sigma for std 0.02:
    # a plain normal. jax's truncated_normal would cut at +-2 sigma and shrink the std by ~12%.
    def init(key, shape, dtype=jnp.float32):
        return stddev * jax.random.normal(key, shape, dtype)

    return init


def torch_default_uniform_init(fan_in: int):
    """PyTorch's default Linear/Conv init: kaiming_uniform(a=sqrt(5)) on the weight and its bias
    init both reduce to uniform(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class TokenLinear(nnx.Linear):
    """`nnx.Linear` applied to the rows of a (..., in) array flattened to 2-D, (rows, in) @ (in, out).

    The same parameters and result as `nnx.Linear` on (B, N, in) tokens. Why: the weight gradient of
    a 3-D product contracts two axes, and XLA:CPU lays the output gradient out transposed for it (a
    transposing copy, the gradient recomputed once per consumer): one qkv projection's forward and
    backward on (128, 65, 192) took 85 ms against 48 ms on 2-D rows (docs/benchmarks.md). The
    reshape is free (a bitcast) on every backend.
    """

    def __call__(self, x: jax.Array) -> jax.Array:
        rows_RxI = x.reshape(-1, x.shape[-1])
        return super().__call__(rows_RxI).reshape(*x.shape[:-1], -1)


def linear(
    in_features: int, out_features: int, *, dtype, rngs: nnx.Rngs, use_bias: bool = True
) -> nnx.Linear:
    return TokenLinear(
        in_features,
        out_features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=normal_init(0.02),
        bias_init=nnx.initializers.zeros_init(),
        rngs=rngs,
    )


def layer_norm(dim: int, *, eps: float, dtype, rngs: nnx.Rngs) -> LayerNorm:
    # Statistics in float32 whatever `dtype` is; the backward is written out (fused_grads.py).
    return LayerNorm(dim, epsilon=eps, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
