"""A block's attention input, `x -> (x, q, k, v of each crop group)`, as Pallas kernels for CUDA.

With XLA's kernels the first half of a block starts with four passes over the token rows before
attention runs: the norm writes its output, the qkv projection reads it and writes (rows, 3D),
and each crop group's q, k and v are sliced out of that into the separate buffers cuDNN's attention
takes. In the backward pass cuDNN's dq, dk, dv of each group are joined into one (rows, 3D)
gradient, multiplied back through the projection, and the norm's backward and the residual's
gradient follow. Compiled for an H100, these kernels took the CIFAR step (with the MLP branch's
kernels) from 38.8 to 32.3 GB moved (docs/benchmarks.md).

Here one forward kernel per block of rows normalises them and writes q, k and v straight into
each group's own buffers, and one backward kernel reads each group's dq, dk, dv, multiplies them
through the projection on chip, applies the norm's backward and adds the residual path's gradient;
it also writes the normed rows of each group for the weight gradient, an XLA matrix product per
group and part (a contraction over every row).

Each group's rows must start and end on a program's block of rows (`layout_supported`; CIFAR's and
Tiny-ImageNet's 66- and 18-token groups at any batch that is a multiple of 32), so that a program
writes one group only. Numerics as in `fused_mlp.py`: values rounded to the compute dtype where XLA's
form rounds them, float32 statistics and accumulation (`tests/test_fused_qkv.py`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dino_jax.models import triton_tiles as tiles
from dino_jax.models.fused_grads import layer_norm
from dino_jax.models.fused_norm import input_gradient, normed_rows
from dino_jax.models.triton_tiles import BLOCK_ROWS

PARTS = 3  # q, k, v: the projection's columns [q | k | v]


def supported(dim: int) -> bool:
    """Widths whose kernels were compiled (ViT-Tiny's 192; up to 256, whole column chunks): a
    program holds a row whole and multiplies one chunk of columns at a time."""
    return tiles.padded(dim) <= 256 and dim % tiles.COLUMN_CHUNK == 0


def layout_supported(group_rows: tuple[int, ...]) -> bool:
    return tiles.groups_aligned(group_rows)


def _weight_columns(plgpu, w_ref, chunk: int, dim: int):
    """Columns `chunk * COLUMN_CHUNK ...` of W (D, 3D), as a (padded D, COLUMN_CHUNK) tile."""
    pl, _ = tiles.pallas()
    w_rows = tiles.column_mask(w_ref.shape[0], dim).T
    columns = pl.ds(chunk * tiles.COLUMN_CHUNK, tiles.COLUMN_CHUNK)
    return plgpu.load(w_ref.at[:, columns], mask=w_rows, other=0.0)


def _chunks(dim: int):
    """(chunk, part, the chunk's first column within its part) over W's 3D columns [q | k | v]."""
    for chunk in range(PARTS * dim // tiles.COLUMN_CHUNK):
        part, offset = divmod(chunk * tiles.COLUMN_CHUNK, dim)
        yield chunk, part, offset


def _norm_qkv_forward_kernel(x_ref, scale_ref, bias_ref, w_ref, b_ref, *out_refs, rows, dim, eps, group_rows):
    pl, plgpu = tiles.pallas()
    dtype = x_ref.dtype
    cols = tiles.column_mask(x_ref.shape[1], dim)
    rows_ok = tiles.row_mask(rows)
    normed = normed_rows(x_ref, scale_ref, bias_ref, cols, rows_ok & cols, dim, eps)[4]
    groups = tiles.group_blocks(group_rows)
    width = tiles.COLUMN_CHUNK
    for chunk, part, offset in _chunks(dim):
        b = b_ref[pl.ds(chunk * width, width)].astype(dtype)
        y = (pl.dot(normed, _weight_columns(plgpu, w_ref, chunk, dim)).astype(dtype) + b[None, :]).astype(
            dtype
        )
        for group, (first, count) in enumerate(groups):
            target = out_refs[PARTS * group + part].at[:, pl.ds(offset, width)]
            plgpu.store(target, y, mask=rows_ok & tiles.in_group(first, count))


def _norm_qkv_backward_kernel(
    x_ref, dx_out_ref, scale_ref, bias_ref, w_ref, *refs, rows, dim, eps, group_rows
):
    """refs: each group's dq, dk, dv, then dx, each group's normed rows, the partial sums of the
    projection's bias, the norm's scale and bias."""
    pl, plgpu = tiles.pallas()
    groups = tiles.group_blocks(group_rows)
    d_refs, (dx_ref, *rest) = refs[: PARTS * len(groups)], refs[PARTS * len(groups) :]
    normed_refs, (db_ref, dscale_ref, dbias_ref) = rest[: len(groups)], rest[len(groups) :]
    dtype = x_ref.dtype
    cols = tiles.column_mask(x_ref.shape[1], dim)
    rows_ok = tiles.row_mask(rows)
    valid = rows_ok & cols
    _, normalised, inv_std, scale, normed = normed_rows(x_ref, scale_ref, bias_ref, cols, valid, dim, eps)
    dnormed = jnp.zeros((BLOCK_ROWS, cols.shape[1]), jnp.float32)
    width = tiles.COLUMN_CHUNK
    for chunk, part, offset in _chunks(dim):
        d = jnp.zeros((BLOCK_ROWS, width), dtype)
        for group, (first, count) in enumerate(groups):
            # Only this program's own group has rows here; the other loads are masked off whole.
            source = d_refs[PARTS * group + part].at[:, pl.ds(offset, width)]
            d += plgpu.load(source, mask=rows_ok & tiles.in_group(first, count), other=0.0).astype(dtype)
        dnormed += pl.dot(d, _weight_columns(plgpu, w_ref, chunk, dim), trans_b=True)
        db_ref[pl.ds(chunk * width, width)] = jnp.sum(d.astype(jnp.float32), axis=0)
    dnormed = dnormed.astype(dtype).astype(jnp.float32)
    dresidual = plgpu.load(dx_out_ref, mask=valid, other=0.0).astype(jnp.float32)
    dx = dresidual + input_gradient(dnormed, scale, normalised, inv_std, dim)
    plgpu.store(dx_ref, dx.astype(dtype), mask=valid)
    for group, (first, count) in enumerate(groups):
        plgpu.store(normed_refs[group], normed, mask=valid & tiles.in_group(first, count))
    plgpu.store(dscale_ref, jnp.sum(dnormed * normalised, axis=0), mask=cols[0])
    plgpu.store(dbias_ref, jnp.sum(dnormed, axis=0), mask=cols[0])


def _parameter_specs(dim):
    pl, _ = tiles.pallas()
    padded, wide = tiles.padded(dim), tiles.padded(PARTS * dim)
    vector = pl.BlockSpec((padded,), lambda i: (0,))
    return (
        vector,
        vector,
        pl.BlockSpec((padded, wide), lambda i: (0, 0)),
        pl.BlockSpec((wide,), lambda i: (0,)),
    )


def _forward(x_RxD, params, group_rows, eps, interpret):
    rows, dim = x_RxD.shape
    tiles.check_groups(rows, group_rows)
    groups = tiles.group_blocks(group_rows)
    group_shape = [jax.ShapeDtypeStruct((g, dim), x_RxD.dtype) for g in group_rows]
    call = tiles.call(
        _norm_qkv_forward_kernel,
        tuple(shape for shape in group_shape for _ in range(PARTS)),
        [tiles.row_block(dim), *_parameter_specs(dim)],
        tuple(tiles.group_block(dim, first, count) for first, count in groups for _ in range(PARTS)),
        rows,
        interpret,
        dim=dim,
        eps=eps,
        group_rows=group_rows,
    )
    flat = call(x_RxD, *params)
    return [tuple(flat[PARTS * g : PARTS * g + PARTS]) for g in range(len(group_rows))]


def _backward(x_RxD, dx_out_RxD, d_groups, params, group_rows, eps, interpret):
    rows, dim = x_RxD.shape
    tiles.check_groups(rows, group_rows)
    groups = tiles.group_blocks(group_rows)
    scale_spec, bias_spec, w_spec, _ = _parameter_specs(dim)
    group_specs = [tiles.group_block(dim, first, count) for first, count in groups]
    partial = lambda width: jax.ShapeDtypeStruct((tiles.blocks(rows), width), jnp.float32)  # noqa: E731
    out_shape = [jax.ShapeDtypeStruct((rows, dim), x_RxD.dtype)]
    out_shape += [jax.ShapeDtypeStruct((g, dim), x_RxD.dtype) for g in group_rows]
    out_shape += [partial(PARTS * dim), partial(dim), partial(dim)]
    pl, _ = tiles.pallas()
    wide_partial = pl.BlockSpec((None, tiles.padded(PARTS * dim)), lambda i: (i, 0))
    call = tiles.call(
        _norm_qkv_backward_kernel,
        tuple(out_shape),
        [tiles.row_block(dim), tiles.row_block(dim), scale_spec, bias_spec, w_spec]
        + [spec for spec in group_specs for _ in range(PARTS)],
        (tiles.row_block(dim), *group_specs, wide_partial, tiles.partial_sums(dim), tiles.partial_sums(dim)),
        rows,
        interpret,
        dim=dim,
        eps=eps,
        group_rows=group_rows,
    )
    scale, bias, w, _ = params
    flat_d = [d for group in d_groups for d in group]
    return call(x_RxD, dx_out_RxD, scale, bias, w, *flat_d)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def norm_qkv(
    x_RxD, scale_D, bias_D, w_Dx3D, b_3D, group_rows: tuple[int, ...], eps: float, interpret: bool = False
):
    """`(x, [(q, k, v) of each group])`: the residual path and the attention's inputs of a pre-norm
    block. x, the projection's weight and bias in the compute dtype, the norm's scale and bias
    float32; `group_rows`: the rows of each crop group, in order (their sum is x's rows). q, k, v
    of a group are (rows_g, D), heads side by side as the projection's columns hold them.
    `interpret`: the kernels in Pallas' interpreter (any backend; how the tests check them)."""
    return x_RxD, _forward(x_RxD, (scale_D, bias_D, w_Dx3D, b_3D), group_rows, eps, interpret)


def _norm_qkv_forward(x_RxD, scale_D, bias_D, w_Dx3D, b_3D, group_rows, eps, interpret):
    params = (scale_D, bias_D, w_Dx3D, b_3D)
    return (x_RxD, _forward(x_RxD, params, group_rows, eps, interpret)), (x_RxD, params)


def _norm_qkv_backward(group_rows, eps, interpret, residuals, cotangents):
    x_RxD, params = residuals
    dx_out_RxD, d_groups = cotangents
    d_groups = [tuple(d.astype(x_RxD.dtype) for d in group) for group in d_groups]
    dx, *rest = _backward(x_RxD, dx_out_RxD.astype(x_RxD.dtype), d_groups, params, group_rows, eps, interpret)
    normed_groups, (db_parts, dscale_parts, dbias_parts) = rest[: len(group_rows)], rest[len(group_rows) :]
    # W's gradient, part by part: each group's normed rows against its dq, dk or dv (float32 sums).
    dw = jnp.concatenate(
        [
            sum(
                jnp.dot(normed.T, d[part], preferred_element_type=jnp.float32)
                for normed, d in zip(normed_groups, d_groups)
            )
            for part in range(PARTS)
        ],
        axis=1,
    )
    scale_D, _, w_Dx3D, b_3D = params
    return (
        dx,
        jnp.sum(dscale_parts, axis=0).astype(scale_D.dtype),
        jnp.sum(dbias_parts, axis=0).astype(scale_D.dtype),
        dw.astype(w_Dx3D.dtype),
        jnp.sum(db_parts, axis=0).astype(b_3D.dtype),
    )


norm_qkv.defvjp(_norm_qkv_forward, _norm_qkv_backward)


def xla_norm_qkv(x_RxD, scale_D, bias_D, w_Dx3D, b_3D, group_rows, eps):
    """The same in XLA's kernels (the model's form off CUDA): the kernels' reference."""
    qkv = jnp.dot(layer_norm(x_RxD, scale_D, bias_D, eps), w_Dx3D) + b_3D
    dim = x_RxD.shape[1]
    out, first = [], 0
    for rows in group_rows:
        piece = qkv[first : first + rows]
        out.append(tuple(piece[:, part * dim : (part + 1) * dim] for part in range(PARTS)))
        first += rows
    return x_RxD, out
