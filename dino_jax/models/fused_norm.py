"""A block's pre-norm, `x -> (x, LayerNorm(x))`, whose backward is one Pallas kernel for CUDA.

Each transformer block reads its input twice: through the residual path and through a LayerNorm.
Their gradients meet in a sum, `dx = d_residual + LayerNorm'(x) d_normed`. Written with XLA's
kernels, that backward took four passes over the token rows per norm (two row reductions, the
input gradient, the sum with the residual's gradient; ~300 MB per norm of the CIFAR student,
compiled for an H100: docs/benchmarks.md). Here one kernel per block of rows reads x and both
gradients once, recomputes the row statistics on chip, writes dx, and leaves per-block partial
sums for the scale and bias gradients.

Blocks use it where `fused_qkv.py`, which folds this norm into the attention's input kernels,
cannot take the layout (crop groups that do not fill whole row blocks). The forward stays XLA's (`fused_grads._layer_norm_forward`, already one pass). Numerics: float32
statistics and arithmetic, one rounding of dx to the compute dtype after the sum (XLA's form
rounds the norm's gradient, then the sum), so the result is at least as close to float32 as XLA's
(`tests/test_fused_norm.py`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dino_jax.models import triton_tiles as tiles
from dino_jax.models.fused_grads import _layer_norm_forward, layer_norm


def row_statistics(x, cols, dim: int, eps: float):
    """`(normalised, inv_std)` of float32 rows whose padded columns (`cols` False) are zero: the
    biased-variance statistics of `fused_grads.layer_norm`, padded columns kept out."""
    mean = jnp.sum(x, axis=1, keepdims=True) / dim
    centred = jnp.where(cols, x - mean, 0.0)
    inv_std = jax.lax.rsqrt(jnp.sum(centred * centred, axis=1, keepdims=True) / dim + eps)
    return centred * inv_std, inv_std


def normed_rows(x_ref, scale_ref, bias_ref, cols, valid, dim: int, eps: float):
    """A program's rows and their LayerNorm: `(x, normalised, inv_std, scale, norm(x) in x's
    dtype)`, float32 but the last. Padded columns are zero in all of them."""
    _, plgpu = tiles.pallas()
    x = plgpu.load(x_ref, mask=valid, other=0.0).astype(jnp.float32)
    scale = plgpu.load(scale_ref, mask=cols[0], other=0.0).astype(jnp.float32)[None, :]
    bias = plgpu.load(bias_ref, mask=cols[0], other=0.0).astype(jnp.float32)[None, :]
    normalised, inv_std = row_statistics(x, cols, dim, eps)
    return x, normalised, inv_std, scale, (normalised * scale + bias).astype(x_ref.dtype)


def input_gradient(dnormed, scale, normalised, inv_std, dim: int):
    """LayerNorm's input gradient (float32 rows) from its output's, as `fused_grads` writes it."""
    g = dnormed * scale
    mean_g = jnp.sum(g, axis=1, keepdims=True) / dim
    mean_gn = jnp.sum(g * normalised, axis=1, keepdims=True) / dim
    return inv_std * (g - mean_g - normalised * mean_gn)


def _norm_backward_kernel(
    x_ref, dnormed_ref, dresidual_ref, scale_ref, dx_ref, dscale_ref, dbias_ref, *, rows, dim, eps
):
    _, plgpu = tiles.pallas()
    cols = tiles.column_mask(x_ref.shape[1], dim)
    valid = tiles.row_mask(rows) & cols
    x = plgpu.load(x_ref, mask=valid, other=0.0).astype(jnp.float32)
    dnormed = plgpu.load(dnormed_ref, mask=valid, other=0.0).astype(jnp.float32)
    dresidual = plgpu.load(dresidual_ref, mask=valid, other=0.0).astype(jnp.float32)
    scale = plgpu.load(scale_ref, mask=cols[0], other=0.0).astype(jnp.float32)[None, :]
    normalised, inv_std = row_statistics(x, cols, dim, eps)
    dx = input_gradient(dnormed, scale, normalised, inv_std, dim)
    plgpu.store(dx_ref, (dresidual + dx).astype(dx_ref.dtype), mask=valid)
    plgpu.store(dscale_ref, jnp.sum(dnormed * normalised, axis=0), mask=cols[0])
    plgpu.store(dbias_ref, jnp.sum(dnormed, axis=0), mask=cols[0])


def _backward(x_RxD, scale_D, dnormed_RxD, dresidual_RxD, eps, interpret):
    rows, dim = x_RxD.shape
    partial = jax.ShapeDtypeStruct((tiles.blocks(rows), dim), jnp.float32)
    pl, _ = tiles.pallas()
    call = tiles.call(
        _norm_backward_kernel,
        (jax.ShapeDtypeStruct((rows, dim), x_RxD.dtype), partial, partial),
        [tiles.row_block(dim)] * 3 + [pl.BlockSpec((tiles.padded(dim),), lambda i: (0,))],
        (tiles.row_block(dim), tiles.partial_sums(dim), tiles.partial_sums(dim)),
        rows,
        interpret,
        dim=dim,
        eps=eps,
    )
    return call(x_RxD, dnormed_RxD, dresidual_RxD, scale_D)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def residual_and_norm(x_RxD, scale_D, bias_D, eps: float, interpret: bool = False):
    """`(x, layer_norm(x))` on token rows (x in the compute dtype): the residual path and the
    normed branch input of a pre-norm block, differentiated together by one kernel.
    `interpret`: Pallas' interpreter (any backend; how the tests check the kernel on a CPU)."""
    return x_RxD, layer_norm(x_RxD, scale_D, bias_D, eps)


def _forward(x_RxD, scale_D, bias_D, eps, interpret):
    normed = _layer_norm_forward(x_RxD, scale_D, bias_D, eps)[0]
    return (x_RxD, normed), (x_RxD, scale_D)


def _backward_rule(eps, interpret, residuals, cotangents):
    x_RxD, scale_D = residuals
    dresidual_RxD, dnormed_RxD = cotangents
    dx, dscale_parts, dbias_parts = _backward(
        x_RxD, scale_D, dnormed_RxD.astype(x_RxD.dtype), dresidual_RxD.astype(x_RxD.dtype), eps, interpret
    )
    dtype = scale_D.dtype
    return dx, jnp.sum(dscale_parts, axis=0).astype(dtype), jnp.sum(dbias_parts, axis=0).astype(dtype)


residual_and_norm.defvjp(_forward, _backward_rule)


def supported(dim: int) -> bool:
    """Whether a program can hold a row of the padded width whole."""
    return tiles.padded(dim) <= 1024
