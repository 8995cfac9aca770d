"""A block's attention output, `x + drop_path(join(o of each group) W + b)`, as Pallas kernels for CUDA.

With XLA's kernels, the attention's outputs of the crop groups are joined into one (rows, D) matrix,
projected, scaled by stochastic depth and added to the residual stream: four passes over the token
rows, and in the backward pass the scaled gradient, the projection's input gradient and its split
back into the groups are three more. Here one forward kernel per block of rows reads its group's
attention output and the residual rows, and writes their sum; one backward kernel reads the output
gradient and writes each group's input gradient and scaled output gradient (for the weight's
gradient, an XLA matrix product per group), with partial sums for the bias. The residual path's
gradient is the output gradient itself: no pass at all.

Each group's rows must fill whole blocks of rows (`triton_tiles.groups_aligned`), as in
`fused_qkv.py`. Numerics as in `fused_mlp.py`: values rounded to the compute dtype where XLA's form
rounds them (the projection's product and bias add, the branch after stochastic depth, the
gradients), float32 accumulation (`tests/test_fused_proj.py`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dino_jax.models import triton_tiles as tiles


def _own_group_rows(plgpu, refs, groups, valid, dtype):
    """This program's rows of its own group's buffer among `refs` (one per group); the other
    groups' loads are masked off whole."""
    out = jnp.zeros(valid.shape, dtype)
    for ref, (first, count) in zip(refs, groups):
        out += plgpu.load(ref, mask=valid & tiles.in_group(first, count), other=0.0).astype(dtype)
    return out


def _proj_forward_kernel(x_ref, w_ref, b_ref, factor_ref, *refs, rows, dim, group_rows):
    pl, plgpu = tiles.pallas()
    groups = tiles.group_blocks(group_rows)
    o_refs, out_ref = refs[: len(groups)], refs[len(groups)]
    dtype = x_ref.dtype
    cols = tiles.column_mask(x_ref.shape[1], dim)
    rows_ok = tiles.row_mask(rows)
    o = _own_group_rows(plgpu, o_refs, groups, rows_ok & cols, dtype)
    factors = tiles.row_factors(factor_ref, rows)
    width = tiles.COLUMN_CHUNK
    for chunk in range(dim // width):  # the output's columns, a chunk at a time
        columns = pl.ds(chunk * width, width)
        w = plgpu.load(w_ref.at[:, columns], mask=cols.T, other=0.0)
        b = b_ref[columns].astype(jnp.float32)[None, :]
        branch = tiles.rounded(tiles.rounded(pl.dot(o, w), dtype) + b, dtype)
        if factors is not None:
            branch = tiles.rounded(branch * factors, dtype)
        x = plgpu.load(x_ref.at[:, columns], mask=rows_ok, other=0.0).astype(jnp.float32)
        plgpu.store(out_ref.at[:, columns], (x + branch).astype(dtype), mask=rows_ok)


def _proj_backward_kernel(dout_ref, w_ref, factor_ref, *refs, rows, dim, group_rows):
    """refs: each group's input gradient, then each group's scaled output gradient, then the bias's
    partial sums."""
    pl, plgpu = tiles.pallas()
    groups = tiles.group_blocks(group_rows)
    do_refs, dbranch_refs, db_ref = refs[: len(groups)], refs[len(groups) : 2 * len(groups)], refs[-1]
    dtype = dout_ref.dtype
    cols = tiles.column_mask(dout_ref.shape[1], dim)
    rows_ok = tiles.row_mask(rows)
    valid = rows_ok & cols
    dbranch = plgpu.load(dout_ref, mask=valid, other=0.0).astype(jnp.float32)
    factors = tiles.row_factors(factor_ref, rows)
    if factors is not None:
        dbranch = tiles.rounded(dbranch * factors, dtype)
    dbranch_low = dbranch.astype(dtype)
    width = tiles.COLUMN_CHUNK
    for chunk in range(dim // width):  # the input gradient's columns: W's rows, a chunk at a time
        columns = pl.ds(chunk * width, width)
        w_rows = plgpu.load(w_ref.at[columns, :], mask=cols, other=0.0)
        do = pl.dot(dbranch_low, w_rows, trans_b=True).astype(dtype)
        for group, (first, count) in enumerate(groups):
            plgpu.store(do_refs[group].at[:, columns], do, mask=rows_ok & tiles.in_group(first, count))
    for group, (first, count) in enumerate(groups):
        plgpu.store(dbranch_refs[group], dbranch_low, mask=valid & tiles.in_group(first, count))
    plgpu.store(db_ref, jnp.sum(dbranch, axis=0), mask=cols[0])


def _weight_specs(dim):
    pl, _ = tiles.pallas()
    padded = tiles.padded(dim)
    return pl.BlockSpec((padded, padded), lambda i: (0, 0)), pl.BlockSpec((padded,), lambda i: (0,))


def _factor_spec():
    pl, _ = tiles.pallas()
    return pl.BlockSpec((tiles.BLOCK_ROWS,), lambda i: (i,))


def supported(dim: int) -> bool:
    """Widths whose kernels were compiled (ViT-Tiny's 192; up to 256, whole column chunks)."""
    return tiles.padded(dim) <= 256 and dim % tiles.COLUMN_CHUNK == 0


def _forward(x_RxD, o_groups, w_DxD, b_D, factor_R, group_rows, interpret):
    rows, dim = x_RxD.shape
    tiles.check_groups(rows, group_rows)
    groups = tiles.group_blocks(group_rows)
    w_spec, b_spec = _weight_specs(dim)
    kernel = _proj_forward_kernel if factor_R is not None else tiles.without(_proj_forward_kernel, (3,))
    call = tiles.call(
        kernel,
        jax.ShapeDtypeStruct(x_RxD.shape, x_RxD.dtype),
        [tiles.row_block(dim), w_spec, b_spec]
        + ([_factor_spec()] if factor_R is not None else [])
        + [tiles.group_block(dim, first, count) for first, count in groups],
        tiles.row_block(dim),
        rows,
        interpret,
        dim=dim,
        group_rows=group_rows,
    )
    return call(x_RxD, w_DxD, b_D, *([] if factor_R is None else [factor_R]), *o_groups)


def _backward(dout_RxD, w_DxD, factor_R, group_rows, interpret):
    rows, dim = dout_RxD.shape
    tiles.check_groups(rows, group_rows)
    groups = tiles.group_blocks(group_rows)
    w_spec, _ = _weight_specs(dim)
    group_specs = [tiles.group_block(dim, first, count) for first, count in groups]
    group_shapes = [jax.ShapeDtypeStruct((g, dim), dout_RxD.dtype) for g in group_rows]
    kernel = _proj_backward_kernel if factor_R is not None else tiles.without(_proj_backward_kernel, (2,))
    call = tiles.call(
        kernel,
        (*group_shapes, *group_shapes, jax.ShapeDtypeStruct((tiles.blocks(rows), dim), jnp.float32)),
        [tiles.row_block(dim), w_spec] + ([_factor_spec()] if factor_R is not None else []),
        (*group_specs, *group_specs, tiles.partial_sums(dim)),
        rows,
        interpret,
        dim=dim,
        group_rows=group_rows,
    )
    outputs = call(dout_RxD, w_DxD, *([] if factor_R is None else [factor_R]))
    count = len(group_rows)
    return outputs[:count], outputs[count : 2 * count], outputs[-1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def projected_residual(
    x_RxD, o_groups, w_DxD, b_D, factor_R, group_rows: tuple[int, ...], interpret: bool = False
):
    """`x + factor * (join(o_groups) W + b)`: the attention branch's end in a pre-norm block.

    x, each group's attention output `o_groups[g]` (rows_g, D), W and b in the compute dtype;
    `factor_R` (rows,) float32, each row's `keep / (1 - rate)` of stochastic depth, or None for none.
    `interpret`: the kernels in Pallas' interpreter (any backend; how the tests check them)."""
    return _forward(x_RxD, o_groups, w_DxD, b_D, factor_R, group_rows, interpret)


def _projected_residual_forward(x_RxD, o_groups, w_DxD, b_D, factor_R, group_rows, interpret):
    out = _forward(x_RxD, o_groups, w_DxD, b_D, factor_R, group_rows, interpret)
    return out, (o_groups, w_DxD, b_D, factor_R)


def _projected_residual_backward(group_rows, interpret, residuals, dout_RxD):
    o_groups, w_DxD, b_D, factor_R = residuals
    do_groups, dbranch_groups, db_parts = _backward(dout_RxD, w_DxD, factor_R, group_rows, interpret)
    dw = sum(jnp.dot(o.T, d, preferred_element_type=jnp.float32) for o, d in zip(o_groups, dbranch_groups))
    return (
        dout_RxD,  # the residual path
        type(o_groups)(do_groups),
        dw.astype(w_DxD.dtype),
        jnp.sum(db_parts, axis=0).astype(b_D.dtype),
        None if factor_R is None else jnp.zeros_like(factor_R),
    )


projected_residual.defvjp(_projected_residual_forward, _projected_residual_backward)


def xla_projected_residual(x_RxD, o_groups, w_DxD, b_D, factor_R):
    """The same in XLA's kernels (the model's form off CUDA): the kernels' reference."""
    branch = jnp.dot(jnp.concatenate(o_groups, axis=0), w_DxD) + b_D
    if factor_R is not None:
        branch = (branch.astype(jnp.float32) * factor_R[:, None]).astype(branch.dtype)
    return x_RxD + branch
