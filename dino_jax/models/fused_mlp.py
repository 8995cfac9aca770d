"""A block's MLP branch, `x + drop_path(fc2(gelu(fc1(LayerNorm(x)))))`, as Pallas kernels for CUDA.

Written with XLA's kernels, the MLP of a ViT-Tiny block is its widest pass over memory: the (rows,
4D) hidden layer is written by fc1, read and written again by GELU, read by fc2, and in the backward
pass written and read four times more (fc2's input gradient, GELU's backward with fc1's bias sum,
fc1's two products); the norm before it, the stochastic depth and the residual add after it are
each one more pass over the token rows. XLA:GPU fuses none of them into the matrix kernels around
them. Compiled for an H100, these passes were ~18 of the CIFAR step's 58 GB (docs/benchmarks.md).

Here (Pallas on Triton, so the same kernels serve Ampere, Hopper and Turing):
- forward: one kernel per block of token rows normalises its rows, computes `x W1 + b1`, GELU and
  `@ W2 + b2` chunk by chunk of the hidden layer, accumulating on chip, scales each row by its
  stochastic-depth factor and adds the residual: only x and the output touch memory;
- backward: one kernel recomputes the norm and each hidden chunk from x (a third more of the MLP's
  matrix work, on a step bound by memory traffic), and writes the input gradient (the norm's
  backward and the residual's gradient included), the hidden gradient, GELU's output and the
  normed input (the weight gradients' operands), plus per-block partial sums for the biases and
  the norm's parameters; the weight gradients are two XLA matrix products over those (a
  contraction over every row, which cuBLAS does well).

Numerics: each value is rounded to the compute dtype where the XLA form rounds it (the norm's
output, fc1's product and bias add, GELU's output, fc2's product and bias add, the branch after
stochastic depth; the hidden gradient and the norm's output gradient), with float32 statistics and
float32 accumulation in every product, so results agree with the XLA form to a unit in the last
place of the compute dtype (`tests/test_fused_mlp.py`). Stochastic depth multiplies by each row's
`keep / (1 - rate)` in float32 where the XLA form divides by `1 - rate` and multiplies by the 0/1
keep mask. GELU is the exact (erf) one: Triton has no erf, so `_normal_cdf` evaluates it from a
rational approximation of erfc with relative error below 1.2e-7.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dino_jax.models import triton_tiles as tiles
from dino_jax.models.fused_grads import gelu, layer_norm
from dino_jax.models.fused_norm import input_gradient, normed_rows
from dino_jax.models.triton_tiles import BLOCK_ROWS

# Hidden units per step of a program's loop. 32, not triton_tiles.COLUMN_CHUNK: the backward keeps
# two (64, 256) bfloat16 operands (the normed rows, the output gradient) on chip for every chunk, and
# with 64-unit chunks it asked for 104 KiB of shared memory, compiled for an L4 (99 KiB per block).
HIDDEN_CHUNK = 32

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
    """Whether the kernels take this MLP: the hidden width a whole number of chunks, and a row no
    wider than the widths compiled (ViT-Tiny's 192 is read as 256)."""
    return hidden % HIDDEN_CHUNK == 0 and tiles.padded(dim) <= 256


def _hidden_chunk(pl, plgpu, normed, w1_ref, b1_ref, w_rows, chunk):
    """`(fc1's output of this chunk in float32, W1's columns of it)`, rounded as XLA's form rounds."""
    units = pl.ds(chunk * HIDDEN_CHUNK, HIDDEN_CHUNK)
    w1 = plgpu.load(w1_ref.at[:, units], mask=w_rows, other=0.0)
    b1 = b1_ref[units].astype(jnp.float32)[None, :]
    dtype = normed.dtype
    return tiles.rounded(tiles.rounded(pl.dot(normed, w1), dtype) + b1, dtype), w1


def _mlp_branch_forward_kernel(
    x_ref, scale_ref, bias_ref, w1_ref, b1_ref, w2_ref, b2_ref, factor_ref, out_ref, *, rows, dim, hidden, eps
):
    pl, plgpu = tiles.pallas()
    dtype = x_ref.dtype
    cols = tiles.column_mask(x_ref.shape[1], dim)
    valid = tiles.row_mask(rows) & cols
    x, _, _, _, normed = normed_rows(x_ref, scale_ref, bias_ref, cols, valid, dim, eps)
    acc = jnp.zeros((BLOCK_ROWS, x_ref.shape[1]), jnp.float32)
    for chunk in range(hidden // HIDDEN_CHUNK):
        h, _ = _hidden_chunk(pl, plgpu, normed, w1_ref, b1_ref, cols.T, chunk)
        g = _gelu_and_slope(h)[0].astype(dtype)
        units = pl.ds(chunk * HIDDEN_CHUNK, HIDDEN_CHUNK)
        acc += pl.dot(g, plgpu.load(w2_ref.at[units, :], mask=cols, other=0.0))
    b2 = plgpu.load(b2_ref, mask=cols[0], other=0.0).astype(jnp.float32)[None, :]
    branch = tiles.rounded(tiles.rounded(acc, dtype) + b2, dtype)
    factors = tiles.row_factors(factor_ref, rows)
    if factors is not None:
        branch = tiles.rounded(branch * factors, dtype)
    plgpu.store(out_ref, (x + branch).astype(dtype), mask=valid)


def _mlp_branch_backward_kernel(
    x_ref, dout_ref, scale_ref, bias_ref, w1_ref, b1_ref, w2_ref, factor_ref,
    dx_ref, dh_ref, g_ref, normed_ref, dbranch_ref, db1_ref, db2_ref, dscale_ref, dbias_ref,
    *, rows, dim, hidden, eps,
):  # fmt: skip
    pl, plgpu = tiles.pallas()
    dtype = x_ref.dtype
    cols = tiles.column_mask(x_ref.shape[1], dim)
    rows_ok = tiles.row_mask(rows)
    valid = rows_ok & cols
    _, normalised, inv_std, scale, normed = normed_rows(x_ref, scale_ref, bias_ref, cols, valid, dim, eps)
    dout = plgpu.load(dout_ref, mask=valid, other=0.0).astype(jnp.float32)
    factors = tiles.row_factors(factor_ref, rows)
    dbranch = dout if factors is None else tiles.rounded(dout * factors, dtype)  # the MLP output's gradient
    dbranch_low = dbranch.astype(dtype)
    dnormed = jnp.zeros((BLOCK_ROWS, x_ref.shape[1]), jnp.float32)
    for chunk in range(hidden // HIDDEN_CHUNK):
        units = pl.ds(chunk * HIDDEN_CHUNK, HIDDEN_CHUNK)
        h, w1 = _hidden_chunk(pl, plgpu, normed, w1_ref, b1_ref, cols.T, chunk)
        g, slope = _gelu_and_slope(h)
        w2 = plgpu.load(w2_ref.at[units, :], mask=cols, other=0.0)
        dg = tiles.rounded(pl.dot(dbranch_low, w2, trans_b=True), dtype)
        # Rows past the end have a zero output gradient, so their dh is 0 * slope = 0.
        dh = jnp.where(rows_ok, dg * slope, 0.0).astype(dtype)
        plgpu.store(dh_ref.at[:, units], dh, mask=rows_ok)
        plgpu.store(g_ref.at[:, units], g.astype(dtype), mask=rows_ok)
        db1_ref[units] = jnp.sum(dh.astype(jnp.float32), axis=0)
        dnormed += pl.dot(dh, w1, trans_b=True)
    dnormed = tiles.rounded(dnormed, dtype)
    dx = dout + input_gradient(dnormed, scale, normalised, inv_std, dim)  # residual + norm paths
    plgpu.store(dx_ref, dx.astype(dtype), mask=valid)
    plgpu.store(normed_ref, normed, mask=valid)
    if dbranch_ref is not None:
        plgpu.store(dbranch_ref, dbranch_low, mask=valid)
    plgpu.store(db2_ref, jnp.sum(dbranch, axis=0), mask=cols[0])
    plgpu.store(dscale_ref, jnp.sum(dnormed * normalised, axis=0), mask=cols[0])
    plgpu.store(dbias_ref, jnp.sum(dnormed, axis=0), mask=cols[0])


def _specs(dim, hidden, factors: bool):
    """Inputs after x (and the output gradient): the norm's and the MLP's parameters whole in every
    program (padded columns of D, masked by the kernels), then the rows' factors if any."""
    pl, _ = tiles.pallas()
    padded = tiles.padded(dim)
    vector = pl.BlockSpec((padded,), lambda i: (0,))
    specs = [
        vector,
        vector,
        pl.BlockSpec((padded, hidden), lambda i: (0, 0)),
        pl.BlockSpec((hidden,), lambda i: (0,)),
        pl.BlockSpec((hidden, padded), lambda i: (0, 0)),
        vector,
    ]
    return specs + ([pl.BlockSpec((BLOCK_ROWS,), lambda i: (i,))] if factors else [])


def _forward(x_RxD, params, factor_R, eps, interpret):
    rows, dim = x_RxD.shape
    hidden = params[2].shape[1]
    kernel = tiles.without(_mlp_branch_forward_kernel, () if factor_R is not None else (7,))
    call = tiles.call(
        kernel,
        jax.ShapeDtypeStruct(x_RxD.shape, x_RxD.dtype),
        [tiles.row_block(dim), *_specs(dim, hidden, factor_R is not None)],
        tiles.row_block(dim),
        rows,
        interpret,
        dim=dim,
        hidden=hidden,
        eps=eps,
    )
    return call(x_RxD, *params, *([] if factor_R is None else [factor_R]))


def _backward(x_RxD, dout_RxD, params, factor_R, eps, interpret):
    pl, _ = tiles.pallas()
    rows, dim = x_RxD.shape
    hidden = params[2].shape[1]
    dtype = x_RxD.dtype
    drop = factor_R is not None
    rows_d = jax.ShapeDtypeStruct((rows, dim), dtype)
    rows_h = jax.ShapeDtypeStruct((rows, hidden), dtype)
    hidden_block = pl.BlockSpec((BLOCK_ROWS, hidden), lambda i: (i, 0))

    def partial(width):
        return jax.ShapeDtypeStruct((tiles.blocks(rows), width), jnp.float32)

    out_shape = [rows_d, rows_h, rows_h, rows_d] + ([rows_d] if drop else [])
    out_shape += [partial(hidden), partial(dim), partial(dim), partial(dim)]
    out_specs = [tiles.row_block(dim), hidden_block, hidden_block, tiles.row_block(dim)]
    out_specs += [tiles.row_block(dim)] if drop else []
    out_specs += [pl.BlockSpec((None, hidden), lambda i: (i, 0))] + [tiles.partial_sums(dim)] * 3
    kernel = tiles.without(_mlp_branch_backward_kernel, () if drop else (7, 12))  # factors, dbranch
    specs = _specs(dim, hidden, drop)
    parameter_specs = specs[:2] + specs[2:5]  # norm scale, bias, W1, b1, W2 (not b2)
    call = tiles.call(
        kernel,
        tuple(out_shape),
        [tiles.row_block(dim), tiles.row_block(dim), *parameter_specs, *specs[6:]],
        tuple(out_specs),
        rows,
        interpret,
        dim=dim,
        hidden=hidden,
        eps=eps,
    )
    scale, bias, w1, b1, w2, _ = params
    return call(x_RxD, dout_RxD, scale, bias, w1, b1, w2, *([factor_R] if drop else []))


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9))
def mlp_branch(
    x_RxD, scale_D, bias_D, w1_DxH, b1_H, w2_HxD, b2_D, factor_R, eps: float, interpret: bool = False
):
    """`x + factor * MLP(LayerNorm(x))` on token rows: the second half of a pre-norm block.

    x and the MLP's parameters in the compute dtype, the norm's scale and bias float32; `factor_R`
    (rows,) float32, each row's `keep / (1 - rate)` of stochastic depth, or None for none.
    `interpret`: the kernels in Pallas' interpreter (any backend; how the tests check them)."""
    return _forward(x_RxD, (scale_D, bias_D, w1_DxH, b1_H, w2_HxD, b2_D), factor_R, eps, interpret)


def _mlp_branch_forward(x_RxD, scale_D, bias_D, w1_DxH, b1_H, w2_HxD, b2_D, factor_R, eps, interpret):
    params = (scale_D, bias_D, w1_DxH, b1_H, w2_HxD, b2_D)
    return _forward(x_RxD, params, factor_R, eps, interpret), (x_RxD, params, factor_R)


def _mlp_branch_backward(eps, interpret, residuals, dout_RxD):
    x_RxD, params, factor_R = residuals
    outputs = _backward(x_RxD, dout_RxD, params, factor_R, eps, interpret)
    dx, dh_RxH, g_RxH, normed_RxD = outputs[:4]
    dbranch_RxD = outputs[4] if factor_R is not None else dout_RxD
    db1_parts, db2_parts, dscale_parts, dbias_parts = outputs[-4:]
    # The weight gradients contract over every row: XLA's matrix kernels, float32 accumulation.
    dw1 = jnp.dot(normed_RxD.T, dh_RxH, preferred_element_type=jnp.float32)
    dw2 = jnp.dot(g_RxH.T, dbranch_RxD, preferred_element_type=jnp.float32)
    scale_D, _, w1_DxH, *_ = params
    low, norm_dtype = w1_DxH.dtype, scale_D.dtype
    grads = (
        dx,
        jnp.sum(dscale_parts, axis=0).astype(norm_dtype),
        jnp.sum(dbias_parts, axis=0).astype(norm_dtype),
        dw1.astype(low),
        jnp.sum(db1_parts, axis=0).astype(low),
        dw2.astype(low),
        jnp.sum(db2_parts, axis=0).astype(low),
    )
    return grads + (None if factor_R is None else jnp.zeros_like(factor_R),)


mlp_branch.defvjp(_mlp_branch_forward, _mlp_branch_backward)


def xla_mlp_branch(x_RxD, scale_D, bias_D, w1_DxH, b1_H, w2_HxD, b2_D, factor_R, eps: float):
    """The same branch in XLA's kernels (the model's form off CUDA): the kernels' reference."""
    normed = layer_norm(x_RxD, scale_D, bias_D, eps)
    branch = jnp.dot(gelu(jnp.dot(normed, w1_DxH) + b1_H), w2_HxD) + b2_D
    if factor_R is not None:
        branch = (branch.astype(jnp.float32) * factor_R[:, None]).astype(branch.dtype)
    return x_RxD + branch
