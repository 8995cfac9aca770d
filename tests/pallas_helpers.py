"""Checks shared by the tests of the Pallas kernels (tests/test_fused_*.py): each kernel against its
XLA twin, and a whole block with the kernels against the block without."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dino_jax.models.block import Block, TokenLayout
from dino_jax.models.vit import ViTConfig


def assert_same_in_float32(ours, xla) -> None:
    """Every value and gradient the same to 1e-5 of the largest entry, shapes and dtypes equal."""
    assert len(ours) == len(xla)
    for index, (a, b) in enumerate(zip(ours, xla)):
        assert a.shape == b.shape and a.dtype == b.dtype, index
        np.testing.assert_allclose(
            a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))), err_msg=str(index)
        )


def assert_as_close_to_float32_as_xla(truth, ours, xla) -> None:
    """In 16 bits both forms round: each of the kernels' values must be as close to the float32
    computation `truth` as XLA's, within a bfloat16 unit in the last place of the largest value."""
    assert len(truth) == len(ours) == len(xla)
    for index, (t, a, b) in enumerate(zip(truth, ours, xla)):
        assert a.dtype == b.dtype, index
        ulp = float(jnp.max(jnp.abs(t))) * 2.0**-7
        our_error = float(jnp.max(jnp.abs(a.astype(jnp.float32) - t)))
        xla_error = float(jnp.max(jnp.abs(b.astype(jnp.float32) - t)))
        assert our_error <= xla_error + ulp, (index, our_error, xla_error)


def assert_block_matches_without_kernels(
    layout: TokenLayout, keep_branches: jax.Array, dim: int = 48
) -> None:
    """A block (128 hidden units: two chunks of the MLP's kernels; stochastic depth 0.2) on `layout`'s rows
    with the Pallas kernels, interpreted, against the same block without them (float32): the loss
    to 1e-5, every parameter and input gradient to 2e-4."""
    config = ViTConfig(image_size=8, patch_size=4, embed_dim=dim, depth=1, num_heads=2, drop_path_rate=0.2)
    block = Block(dataclasses.replace(config, mlp_ratio=128.5 / dim), rngs=nnx.Rngs(0))
    rows = sum(group.rows for group in layout.groups)
    x = jax.random.normal(jax.random.key(1), (rows, dim))
    weights = jax.random.normal(jax.random.key(2), x.shape)

    def loss(module, rows_in, pallas):
        out = module(
            rows_in, layout, pallas=pallas, interpret=True, drop_path_rate=0.2, keep_branches=keep_branches
        )
        return jnp.sum(out * weights)

    plain = nnx.grad(loss, argnums=(0, 1))(block, x, False)
    kernels = nnx.grad(loss, argnums=(0, 1))(block, x, True)
    np.testing.assert_allclose(loss(block, x, True), loss(block, x, False), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(kernels), jax.tree.leaves(plain)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4)
