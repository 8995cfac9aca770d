"""The attention output's Pallas kernels (dino_jax/models/fused_proj.py), run in Pallas' interpreter
on the CPU against XLA's form, and lowered to Triton without a GPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from dino_jax.models import fused_proj
from dino_jax.models.triton_tiles import BLOCK_ROWS
from tests.pallas_helpers import assert_as_close_to_float32_as_xla, assert_same_in_float32

GROUP_ROWS, DIM = (BLOCK_ROWS, 2 * BLOCK_ROWS), 192  # ViT-Tiny's width: three column chunks, padded


def _arrays(dtype, drop_path=True, group_rows=GROUP_ROWS, dim=DIM):
    keys = jax.random.split(jax.random.key(7), 6)
    rows = sum(group_rows)
    x = jax.random.normal(keys[0], (rows, dim)).astype(dtype)
    o_groups = [
        jax.random.normal(k, (g, dim)).astype(dtype) for k, g in zip(jax.random.split(keys[1], 2), group_rows)
    ]
    w = (jax.random.normal(keys[2], (dim, dim)) * dim**-0.5).astype(dtype)
    b = (0.1 * jax.random.normal(keys[3], (dim,))).astype(dtype)
    factor = (jax.random.uniform(keys[4], (rows,)) < 0.75).astype(jnp.float32) / 0.75 if drop_path else None
    dout = jax.random.normal(keys[5], (rows, dim)).astype(dtype)
    return (x, o_groups, w, b, factor), dout


def _outputs_and_grads(function, args, dout):
    out, vjp = jax.vjp(function, *args)
    dx, do_groups, dw, db, _ = vjp(dout)
    return [out, dx, *do_groups, dw, db]


def _kernels(*args):
    return fused_proj.projected_residual(*args, GROUP_ROWS, True)


@pytest.mark.parametrize("drop_path", [True, False])
def test_kernels_match_the_xla_form_in_float32(drop_path):
    args, dout = _arrays(jnp.float32, drop_path)
    assert_same_in_float32(
        _outputs_and_grads(_kernels, args, dout),
        _outputs_and_grads(fused_proj.xla_projected_residual, args, dout),
    )


def test_kernels_in_bfloat16_are_as_close_to_float32_as_the_xla_form():
    args, dout = _arrays(jnp.bfloat16)
    as_float32 = jax.tree.map(lambda a: a.astype(jnp.float32), args)
    truth = _outputs_and_grads(fused_proj.xla_projected_residual, as_float32, dout.astype(jnp.float32))
    ours = _outputs_and_grads(_kernels, args, dout)
    assert_as_close_to_float32_as_xla(
        truth, ours, _outputs_and_grads(fused_proj.xla_projected_residual, args, dout)
    )


@pytest.mark.parametrize("drop_path", [True, False])
def test_kernels_lower_to_triton_without_a_gpu(drop_path):
    group_rows = (33 * BLOCK_ROWS, 9 * BLOCK_ROWS)
    args, dout = _arrays(jnp.bfloat16, drop_path, group_rows=group_rows, dim=192)
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (args, dout))

    def step(args, dout):
        return _outputs_and_grads(lambda *a: fused_proj.projected_residual(*a, group_rows), args, dout)

    text = jax.jit(step).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 2  # the forward kernel and the backward one
