"""GELU and LayerNorm with their backward passes written out, as PyTorch's kernels compute them.

Autodiff of these two gives the same gradients, but as more passes over the activations: on XLA:CPU
the LayerNorm backward materialised four (tokens, D) broadcasts of its scale and 1/std per norm and
recomputed the normalised input in several fusions, and the GELU backward evaluated `erf` and the
Gaussian density in separate loops over the (tokens, 4D) hidden layer. Written out, each backward
is one elementwise pass plus, for the norm, two row means and two column sums (the CIFAR step at
batch 64 on a 2-core CPU: 7.32 s -> 6.87 s, docs/benchmarks.md). The formulas are the reference's:
`x/2 (1 + erf(x/sqrt 2))` with derivative `Phi(x) + x phi(x)`, and the biased-variance norm.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

_SQRT_HALF = float(np.sqrt(0.5))
_INV_SQRT_2PI = float(1.0 / np.sqrt(2.0 * np.pi))


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, `x/2 * (1 + erf(x/sqrt 2))`, as the reference's nn.GELU.

    Written with erf rather than jax.nn.gelu(approximate=False)'s erfc: XLA:CPU's YNNPACK fusions
    take erf, not erfc, so erfc ran as a separate loop over the MLP activations.
    """
    return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(_SQRT_HALF, x.dtype)))


def _gelu_forward(x):
    return gelu(x), x


def _gelu_backward(x, dy):
    cdf = 0.5 * (1.0 + jax.lax.erf(x * jnp.asarray(_SQRT_HALF, x.dtype)))
    pdf = jnp.exp(-0.5 * x * x) * jnp.asarray(_INV_SQRT_2PI, x.dtype)
    return (dy * (cdf + x * pdf),)


gelu.defvjp(_gelu_forward, _gelu_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x_RxD: jax.Array, scale_D: jax.Array, bias_D: jax.Array, eps: float) -> jax.Array:
    """`(x - mean) / sqrt(var + eps) * scale + bias` over the last axis, biased variance computed
    as the mean of squared deviations (not E[x^2] - E[x]^2), float32 statistics."""
    return _layer_norm_forward(x_RxD, scale_D, bias_D, eps)[0]


def _layer_norm_forward(x_RxD, scale_D, bias_D, eps):
    x = x_RxD.astype(jnp.float32)
    centred = x - jnp.mean(x, axis=-1, keepdims=True)
    variance = jnp.mean(centred * centred, axis=-1, keepdims=True)
    inv_std = jax.lax.rsqrt(variance + eps)
    y = centred * inv_std * scale_D + bias_D
    return y.astype(x_RxD.dtype), (x_RxD, scale_D, inv_std)


def _layer_norm_backward(eps, residuals, dy_RxD):
    del eps  # folded into inv_std
    x_RxD, scale_D, inv_std = residuals
    x = x_RxD.astype(jnp.float32)
    normalised = (x - jnp.mean(x, axis=-1, keepdims=True)) * inv_std
    dy = dy_RxD.astype(jnp.float32)
    g = dy * scale_D
    dx = inv_std * (
        g
        - jnp.mean(g, axis=-1, keepdims=True)
        - normalised * jnp.mean(g * normalised, axis=-1, keepdims=True)
    )
    lead_axes = tuple(range(dy.ndim - 1))
    dscale = jnp.sum(dy * normalised, axis=lead_axes)
    dbias = jnp.sum(dy, axis=lead_axes)
    return dx.astype(x_RxD.dtype), dscale.astype(scale_D.dtype), dbias.astype(scale_D.dtype)


layer_norm.defvjp(_layer_norm_forward, _layer_norm_backward)


class LayerNorm(nnx.LayerNorm):
    """`nnx.LayerNorm` (same parameters `scale`, `bias`) computed by `layer_norm` above; float32
    statistics whatever the compute dtype, output in the compute dtype."""

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        return layer_norm(x.astype(dtype), self.scale[...], self.bias[...], self.epsilon)
