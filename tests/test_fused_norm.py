"""The pre-norm's Pallas backward (dino_jax/models/fused_norm.py), run in Pallas' interpreter on the
CPU against XLA's form, and a whole block with every Pallas kernel against the block without."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dino_jax.models import fused_norm
from dino_jax.models.block import Block, GroupLayout, TokenLayout
from dino_jax.models.fused_grads import layer_norm
from dino_jax.models.vit import ViTConfig

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


NAMES = ("residual", "normed", "dx", "dscale", "dbias")


def test_kernel_matches_the_xla_form_in_float32():
    args, cotangents = _arrays(jnp.float32)
    ours = _outputs_and_grads(_kernel_form, args, cotangents)
    xla = _outputs_and_grads(_xla_form, args, cotangents)
    for name, a, b in zip(NAMES, ours, xla):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))), err_msg=name)


def test_kernel_in_bfloat16_is_as_close_to_float32_as_the_xla_form():
    args, cotangents = _arrays(jnp.bfloat16)
    truth = _outputs_and_grads(
        _xla_form, (args[0].astype(jnp.float32), *args[1:]), tuple(c.astype(jnp.float32) for c in cotangents)
    )
    ours = _outputs_and_grads(_kernel_form, args, cotangents)
    xla = _outputs_and_grads(_xla_form, args, cotangents)
    for name, t, a, b in zip(NAMES, truth, ours, xla):
        ulp = float(jnp.max(jnp.abs(t))) * 2.0**-7
        our_error = float(jnp.max(jnp.abs(a.astype(jnp.float32) - t)))
        xla_error = float(jnp.max(jnp.abs(b.astype(jnp.float32) - t)))
        assert our_error <= xla_error + ulp, (name, our_error, xla_error)


def test_a_block_with_every_pallas_kernel_computes_the_same_block():
    """The block's output and every gradient (input and parameters) with the MLP's kernels and
    both norms' backward kernel, interpreted, against the block without them (float32)."""
    config = ViTConfig(image_size=8, patch_size=4, embed_dim=48, depth=1, num_heads=2, drop_path_rate=0.2)
    config = dataclasses.replace(config, mlp_ratio=128 / 48)  # one chunk of the MLP's kernels
    block = Block(config, rngs=nnx.Rngs(0))
    layout = TokenLayout((GroupLayout(batch=3, tokens=5, valid=5), GroupLayout(batch=3, tokens=2, valid=2)))
    x = jax.random.normal(jax.random.key(1), (layout.groups[0].rows + layout.groups[1].rows, 48))
    keep = jnp.array([[1, 0, 1, 1, 1, 0], [0, 1, 1, 1, 0, 1]], bool)
    weights = jax.random.normal(jax.random.key(2), x.shape)

    def loss(module, rows, pallas):
        out = module(rows, layout, pallas=pallas, interpret=True, drop_path_rate=0.2, keep_branches=keep)
        return jnp.sum(out * weights)

    plain = nnx.grad(loss, argnums=(0, 1))(block, x, False)
    kernels = nnx.grad(loss, argnums=(0, 1))(block, x, True)
    np.testing.assert_allclose(loss(block, x, True), loss(block, x, False), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(kernels), jax.tree.leaves(plain)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4)
