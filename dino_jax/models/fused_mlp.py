"""The transformer MLP, `fc2(gelu(fc1(x)))`, as Pallas kernels for CUDA: the hidden layer stays on chip.

Written with XLA's kernels, the MLP of a ViT-Tiny block is its widest pass over memory: the (rows,
4D) hidden layer is written by fc1, read and written again by GELU, read by fc2, and in the backward
pass written and read four times more (fc2's input gradient, GELU's backward with fc1's bias sum,
fc1's two products). XLA:GPU does not fuse GELU into the matrix kernels around it. Compiled for an
H100, these passes are ~14 of the CIFAR step's 58 GB (docs/benchmarks.md).

Here (Pallas on Triton, so the same kernels serve Ampere, Hopper and Turing):
- forward: one kernel per block of token rows computes `x W1 + b1`, GELU and `@ W2 + b2` chunk by
  chunk of the hidden layer, accumulating the output on chip; only x and y touch memory;
- backward: one kernel recomputes each hidden chunk from x (a third more of the MLP's matrix work,
  on a step bound by memory traffic) and writes the input gradient, the hidden gradient and GELU's
  output, plus per-block partial sums for the biases; the weight gradients are two XLA matrix
  products over those (a contraction over every row, which cuBLAS does well).

Numerics: each value is rounded to the compute dtype where the XLA form rounds it (fc1's product,
its bias add, GELU's output, fc2's product and bias add; the hidden gradient), with float32
accumulation inside every product, so outputs agree with the XLA form to a unit in the last place
of the compute dtype (`tests/test_fused_mlp.py`). GELU is the exact (erf) one: Triton has no erf, so
`_normal_cdf` evaluates it from a rational approximation of erfc with relative error below 1.2e-7.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dino_jax.models import triton_tiles as tiles
from dino_jax.models.fused_grads import gelu
from dino_jax.models.triton_tiles import BLOCK_ROWS

HIDDEN_CHUNK = 128  # hidden units per step of a program's loop

_SQRT_HALF = float(np.sqrt(0.5))
_INV_SQRT_2PI = float(1.0 / np.sqrt(2.0 * np.pi))
# erfc(z) = t exp(-z^2 + P(t)), t = 1 / (1 + z/2), z >= 0: Numerical Recipes' `erfcc` (Chebyshev
# fit, relative error < 1.2e-7 everywhere), coefficients of P from the constant term up.
_ERFC_COEFFICIENTS = (
    -1.26551223,
    1.00002368,
    0.37409196,
    0.09678418,
    -0.18628806,
    0.27886807,
    -1.13520398,
    1.48851587,
    -0.82215223,
    0.17087277,
)


def _normal_cdf(x):
    """Phi(x) = erfc(-x / sqrt 2) / 2 in float32, from elementwise operations Triton lowers."""
    z = jnp.abs(x) * _SQRT_HALF
    t = 1.0 / (1.0 + 0.5 * z)
    poly = jnp.full_like(t, _ERFC_COEFFICIENTS[-1])
    for coefficient in _ERFC_COEFFICIENTS[-2::-1]:
        poly = poly * t + coefficient
    tail = 0.5 * t * jnp.exp(poly - z * z)  # Phi(-|x|)
    return jnp.where(x >= 0, 1.0 - tail, tail)


def _gelu_and_slope(h):
    """GELU(h) = h Phi(h) and its derivative Phi(h) + h phi(h), float32."""
    cdf = _normal_cdf(h)
    return h * cdf, cdf + h * jnp.exp(-0.5 * h * h) * _INV_SQRT_2PI


def supported(dim: int, hidden: int) -> bool:
    """Whether the kernels take this MLP: the hidden width a whole number of chunks, and a row of
    the padded width held whole by a program."""
    return hidden % HIDDEN_CHUNK == 0 and tiles.padded(dim) <= 1024


def _mlp_forward_kernel(x_ref, w1_ref, b1_ref, w2_ref, b2_ref, y_ref, *, rows, dim, hidden):
    pl, plgpu = tiles.pallas()
    dtype = x_ref.dtype
    cols = tiles.column_mask(x_ref.shape[1], dim)
    w_rows = cols.T
    x = plgpu.load(x_ref, mask=tiles.row_mask(rows) & cols, other=0.0)
    out = jnp.zeros((BLOCK_ROWS, x_ref.shape[1]), jnp.float32)
    for chunk in range(hidden // HIDDEN_CHUNK):
        units = pl.ds(chunk * HIDDEN_CHUNK, HIDDEN_CHUNK)
        w1 = plgpu.load(w1_ref.at[:, units], mask=w_rows, other=0.0)
        b1 = b1_ref[units][None, :]
        h = (pl.dot(x, w1).astype(dtype) + b1).astype(jnp.float32)
        g = _gelu_and_slope(h)[0].astype(dtype)
        w2 = plgpu.load(w2_ref.at[units, :], mask=cols, other=0.0)
        out += pl.dot(g, w2)
    y = out.astype(dtype) + plgpu.load(b2_ref, mask=cols[0], other=0.0)[None, :]
    plgpu.store(y_ref, y.astype(dtype), mask=tiles.row_mask(rows) & cols)


def _mlp_backward_kernel(
    x_ref, dy_ref, w1_ref, b1_ref, w2_ref, dx_ref, dh_ref, g_ref, db1_ref, db2_ref, *, rows, dim, hidden
):
    pl, plgpu = tiles.pallas()
    dtype = x_ref.dtype
    cols = tiles.column_mask(x_ref.shape[1], dim)
    w_rows = cols.T
    valid = tiles.row_mask(rows)
    x = plgpu.load(x_ref, mask=valid & cols, other=0.0)
    dy = plgpu.load(dy_ref, mask=valid & cols, other=0.0)
    dx = jnp.zeros((BLOCK_ROWS, x_ref.shape[1]), jnp.float32)
    for chunk in range(hidden // HIDDEN_CHUNK):
        units = pl.ds(chunk * HIDDEN_CHUNK, HIDDEN_CHUNK)
        w1 = plgpu.load(w1_ref.at[:, units], mask=w_rows, other=0.0)
        b1 = b1_ref[units][None, :]
        h = (pl.dot(x, w1).astype(dtype) + b1).astype(jnp.float32)
        g, slope = _gelu_and_slope(h)
        w2 = plgpu.load(w2_ref.at[units, :], mask=cols, other=0.0)
        dg = pl.dot(dy, w2, trans_b=True).astype(dtype).astype(jnp.float32)
        # Rows past the end are zero in x and dy, so their dh is 0 * slope = 0 and adds nothing.
        dh = jnp.where(valid, dg * slope, 0.0).astype(dtype)
        plgpu.store(dh_ref.at[:, units], dh, mask=valid)
        plgpu.store(g_ref.at[:, units], g.astype(dtype), mask=valid)
        db1_ref[units] = jnp.sum(dh.astype(jnp.float32), axis=0)
        dx += pl.dot(dh, w1, trans_b=True)
    plgpu.store(dx_ref, dx.astype(dtype), mask=valid & cols)
    plgpu.store(db2_ref, jnp.sum(dy.astype(jnp.float32), axis=0), mask=cols[0])


def _weight_specs(dim, hidden):
    """W1, b1, W2, b2 whole in every program (padded columns of D; the kernels mask them)."""
    pl, _ = tiles.pallas()
    padded = tiles.padded(dim)
    return [
        pl.BlockSpec((padded, hidden), lambda i: (0, 0)),
        pl.BlockSpec((hidden,), lambda i: (0,)),
        pl.BlockSpec((hidden, padded), lambda i: (0, 0)),
        pl.BlockSpec((padded,), lambda i: (0,)),
    ]


def _forward(x_RxD, w1_DxH, b1_H, w2_HxD, b2_D, interpret):
    rows, dim = x_RxD.shape
    hidden = w1_DxH.shape[1]
    call = tiles.call(
        _mlp_forward_kernel,
        jax.ShapeDtypeStruct(x_RxD.shape, x_RxD.dtype),
        [tiles.row_block(dim), *_weight_specs(dim, hidden)],
        tiles.row_block(dim),
        rows,
        interpret,
        dim=dim,
        hidden=hidden,
    )
    return call(x_RxD, w1_DxH, b1_H, w2_HxD, b2_D)


def _backward(x_RxD, dy_RxD, w1_DxH, b1_H, w2_HxD, interpret):
    pl, _ = tiles.pallas()
    rows, dim = x_RxD.shape
    hidden = w1_DxH.shape[1]
    blocks = tiles.blocks(rows)
    hidden_block = pl.BlockSpec((BLOCK_ROWS, hidden), lambda i: (i, 0))
    dtype = x_RxD.dtype
    w1_spec, b1_spec, w2_spec, _ = _weight_specs(dim, hidden)
    call = tiles.call(
        _mlp_backward_kernel,
        (
            jax.ShapeDtypeStruct((rows, dim), dtype),
            jax.ShapeDtypeStruct((rows, hidden), dtype),
            jax.ShapeDtypeStruct((rows, hidden), dtype),
            jax.ShapeDtypeStruct((blocks, hidden), jnp.float32),
            jax.ShapeDtypeStruct((blocks, dim), jnp.float32),
        ),
        [tiles.row_block(dim), tiles.row_block(dim), w1_spec, b1_spec, w2_spec],
        (
            tiles.row_block(dim),
            hidden_block,
            hidden_block,
            pl.BlockSpec((None, hidden), lambda i: (i, 0)),
            tiles.partial_sums(dim),
        ),
        rows,
        interpret,
        dim=dim,
        hidden=hidden,
    )
    return call(x_RxD, dy_RxD, w1_DxH, b1_H, w2_HxD)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def fused_mlp(x_RxD, w1_DxH, b1_H, w2_HxD, b2_D, interpret: bool = False):
    """`gelu(x W1 + b1) W2 + b2` on token rows, every array in the compute dtype. `interpret`: run
    the kernels in Pallas' interpreter (any backend; how the tests check them on a CPU)."""
    return _forward(x_RxD, w1_DxH, b1_H, w2_HxD, b2_D, interpret)


def _fused_mlp_forward(x_RxD, w1_DxH, b1_H, w2_HxD, b2_D, interpret):
    return _forward(x_RxD, w1_DxH, b1_H, w2_HxD, b2_D, interpret), (x_RxD, w1_DxH, b1_H, w2_HxD)


def _fused_mlp_backward(interpret, residuals, dy_RxD):
    x_RxD, w1_DxH, b1_H, w2_HxD = residuals
    dx, dh_RxH, g_RxH, db1_parts, db2_parts = _backward(x_RxD, dy_RxD, w1_DxH, b1_H, w2_HxD, interpret)
    # The weight gradients contract over every row: XLA's matrix kernels, float32 accumulation.
    dw1 = jnp.dot(x_RxD.T, dh_RxH, preferred_element_type=jnp.float32)
    dw2 = jnp.dot(g_RxH.T, dy_RxD, preferred_element_type=jnp.float32)
    dtype = w1_DxH.dtype
    return (
        dx,
        dw1.astype(dtype),
        jnp.sum(db1_parts, axis=0).astype(dtype),
        dw2.astype(dtype),
        jnp.sum(db2_parts, axis=0).astype(dtype),
    )


fused_mlp.defvjp(_fused_mlp_forward, _fused_mlp_backward)


def xla_mlp(x_RxD, w1_DxH, b1_H, w2_HxD, b2_D):
    """The same MLP as XLA's kernels compute it (the model's form off CUDA): the kernels' reference."""
    return jnp.dot(gelu(jnp.dot(x_RxD, w1_DxH) + b1_H), w2_HxD) + b2_D
