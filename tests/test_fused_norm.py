"""The pre-norm's Pallas backward (dino_jax/models/fused_norm.py), run in Pallas' interpreter on the
CPU against XLA's form, and a whole block with every Pallas kernel against the block without."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dino_jax.models import fused_norm
from dino_jax.models.block import GroupLayout, TokenLayout
from dino_jax.models.fused_grads import layer_norm
from tests.pallas_helpers import (
    assert_as_close_to_float32_as_xla,
    assert_block_matches_without_kernels,
    assert_same_in_float32,
)

ROWS, DIM, EPS = 100, 48, 1e-6  # rows past the last full block, D not a power of two


def _xla_form(x, scale, bias):
    return x, layer_norm(x, scale, bias, EPS)


def _kernel_form(x, scale, bias):
    return fused_norm.residual_and_norm(x, scale, bias, EPS, True)


def _arrays(dtype):
    keys = jax.random.split(jax.random.key(3), 5)
    # An offset mean and a spread of scales per row: the statistics must be the row's own.
    x = jax.random.normal(keys[0], (ROWS, DIM)) * jnp.linspace(0.5, 3.0, ROWS)[:, None] + 2.0
    scale = 1.0 + 0.3 * jax.random.normal(keys[1], (DIM,))
    bias = 0.1 * jax.random.normal(keys[2], (DIM,))
    d_residual = jax.random.normal(keys[3], (ROWS, DIM)).astype(dtype)
    d_normed = jax.random.normal(keys[4], (ROWS, DIM)).astype(dtype)
    return (x.astype(dtype), scale, bias), (d_residual, d_normed)


def _outputs_and_grads(function, args, cotangents):
    outputs, vjp = jax.vjp(function, *args)
    return (*outputs, *vjp(cotangents))


def test_kernel_matches_the_xla_form_in_float32():
    args, cotangents = _arrays(jnp.float32)
    assert_same_in_float32(
        _outputs_and_grads(_kernel_form, args, cotangents), _outputs_and_grads(_xla_form, args, cotangents)
    )


def test_kernel_in_bfloat16_is_as_close_to_float32_as_the_xla_form():
    args, cotangents = _arrays(jnp.bfloat16)
    truth = _outputs_and_grads(
        _xla_form, (args[0].astype(jnp.float32), *args[1:]), tuple(c.astype(jnp.float32) for c in cotangents)
    )
    ours = _outputs_and_grads(_kernel_form, args, cotangents)
    assert_as_close_to_float32_as_xla(truth, ours, _outputs_and_grads(_xla_form, args, cotangents))


def test_a_block_whose_groups_do_not_fill_row_blocks_takes_the_norm_kernel():
    """Groups of 15 and 6 rows: the attention runs in XLA's form with this pre-norm kernel, the MLP
    branch in its kernels; the block is the same block."""
    layout = TokenLayout((GroupLayout(batch=3, tokens=5, valid=5), GroupLayout(batch=3, tokens=2, valid=2)))
    keep = jnp.array([[1, 0, 1, 1, 1, 0], [0, 1, 1, 1, 0, 1]], bool)
    assert_block_matches_without_kernels(layout, keep)
