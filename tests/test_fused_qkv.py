"""The attention input's Pallas kernels (dino_jax/models/fused_qkv.py), run in Pallas' interpreter
on the CPU against XLA's form, lowered to Triton without a GPU, and inside a whole block."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dino_jax.models import fused_qkv
from dino_jax.models.block import Block, GroupLayout, TokenLayout
from dino_jax.models.triton_tiles import BLOCK_ROWS
from dino_jax.models.vit import ViTConfig

GROUP_ROWS, DIM, EPS = (2 * BLOCK_ROWS, BLOCK_ROWS), 48, 1e-6  # two crop groups, D not a power of two


def _arrays(dtype, group_rows=GROUP_ROWS, dim=DIM):
    keys = jax.random.split(jax.random.key(5), 6)
    rows = sum(group_rows)
    x = jax.random.normal(keys[0], (rows, dim)) * jnp.linspace(0.5, 3.0, rows)[:, None] + 1.0
    scale = 1.0 + 0.2 * jax.random.normal(keys[1], (dim,))
    bias = 0.1 * jax.random.normal(keys[2], (dim,))
    w = (jax.random.normal(keys[3], (dim, 3 * dim)) * dim**-0.5).astype(dtype)
    b = (0.1 * jax.random.normal(keys[4], (3 * dim,))).astype(dtype)
    return (x.astype(dtype), scale, bias, w, b), keys[5]


def _outputs_and_grads(function, args, key):
    outputs, vjp = jax.vjp(function, *args)
    leaves, tree = jax.tree.flatten(outputs)
    keys = jax.random.split(key, len(leaves))
    cotangents = [jax.random.normal(k, leaf.shape).astype(leaf.dtype) for k, leaf in zip(keys, leaves)]
    return leaves + list(vjp(jax.tree.unflatten(tree, cotangents)))


def _kernels(*args):
    return fused_qkv.norm_qkv(*args, GROUP_ROWS, EPS, True)


def _xla(*args):
    return fused_qkv.xla_norm_qkv(*args, GROUP_ROWS, EPS)


def test_kernels_match_the_xla_form_in_float32():
    args, key = _arrays(jnp.float32)
    ours, xla = _outputs_and_grads(_kernels, args, key), _outputs_and_grads(_xla, args, key)
    assert len(ours) == 1 + 3 * len(GROUP_ROWS) + 5  # x, q/k/v of each group; five gradients
    for index, (a, b) in enumerate(zip(ours, xla)):
        assert a.shape == b.shape and a.dtype == b.dtype, index
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))), err_msg=str(index))


def test_kernels_in_bfloat16_are_as_close_to_float32_as_the_xla_form():
    args, key = _arrays(jnp.bfloat16)
    truth = _outputs_and_grads(_xla, tuple(a.astype(jnp.float32) for a in args), key)
    ours, xla = _outputs_and_grads(_kernels, args, key), _outputs_and_grads(_xla, args, key)
    for index, (t, a, b) in enumerate(zip(truth, ours, xla)):
        ulp = float(jnp.max(jnp.abs(t))) * 2.0**-7
        our_error = float(jnp.max(jnp.abs(a.astype(jnp.float32) - t)))
        xla_error = float(jnp.max(jnp.abs(b.astype(jnp.float32) - t)))
        assert our_error <= xla_error + ulp, (index, our_error, xla_error)


def test_kernels_lower_to_triton_without_a_gpu():
    group_rows = (33 * BLOCK_ROWS, 9 * BLOCK_ROWS)
    args, key = _arrays(jnp.bfloat16, group_rows=group_rows, dim=192)
    shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]

    def step(*arrays):
        return _outputs_and_grads(lambda *a: fused_qkv.norm_qkv(*a, group_rows, EPS), arrays, key)

    text = jax.jit(step).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 2  # the forward kernel and the backward one


def test_groups_must_fill_whole_blocks_of_rows():
    assert fused_qkv.layout_supported((2 * BLOCK_ROWS, BLOCK_ROWS))
    assert not fused_qkv.layout_supported((2 * BLOCK_ROWS, BLOCK_ROWS + 2))


def test_a_block_with_the_attention_input_kernels_computes_the_same_block():
    """Groups that fill whole row blocks take `fused_qkv` (with the MLP branch's kernels); the
    block's output and every gradient against the block without kernels (float32)."""
    config = ViTConfig(image_size=8, patch_size=4, embed_dim=DIM, depth=1, num_heads=2, drop_path_rate=0.2)
    config = dataclasses.replace(config, mlp_ratio=128 / DIM)
    block = Block(config, rngs=nnx.Rngs(0))
    layout = TokenLayout((GroupLayout(batch=32, tokens=4, valid=3), GroupLayout(batch=32, tokens=2, valid=2)))
    rows = sum(group.rows for group in layout.groups)
    x = jax.random.normal(jax.random.key(1), (rows, DIM))
    keep = jax.random.uniform(jax.random.key(2), (2, 64)) < 0.8
    weights = jax.random.normal(jax.random.key(3), x.shape)

    def loss(module, rows_in, pallas):
        out = module(rows_in, layout, pallas=pallas, interpret=True, drop_path_rate=0.2, keep_branches=keep)
        return jnp.sum(out * weights)

    plain = nnx.grad(loss, argnums=(0, 1))(block, x, False)
    kernels = nnx.grad(loss, argnums=(0, 1))(block, x, True)
    np.testing.assert_allclose(loss(block, x, True), loss(block, x, False), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(kernels), jax.tree.leaves(plain)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4)
