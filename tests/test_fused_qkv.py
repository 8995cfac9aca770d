"""The attention input's Pallas kernels (dino_jax/models/fused_qkv.py), run in Pallas' interpreter
on the CPU against XLA's form, lowered to Triton without a GPU, and inside a whole block."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from dino_jax.models import fused_qkv
from dino_jax.models.block import GroupLayout, TokenLayout
from dino_jax.models.triton_tiles import BLOCK_ROWS
from tests.pallas_helpers import (
    assert_as_close_to_float32_as_xla,
    assert_block_matches_without_kernels,
    assert_same_in_float32,
)

# Two crop groups; D = 192 as ViT-Tiny's: read as 256 columns (the rest masked), three column chunks.
GROUP_ROWS, DIM, EPS = (2 * BLOCK_ROWS, BLOCK_ROWS), 192, 1e-6


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
    assert_same_in_float32(ours, xla)


def test_kernels_in_bfloat16_are_as_close_to_float32_as_the_xla_form():
    args, key = _arrays(jnp.bfloat16)
    truth = _outputs_and_grads(_xla, tuple(a.astype(jnp.float32) for a in args), key)
    ours, xla = _outputs_and_grads(_kernels, args, key), _outputs_and_grads(_xla, args, key)
    assert_as_close_to_float32_as_xla(truth, ours, xla)


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
    # Called with groups that do not, the kernels refuse rather than give a program two groups.
    args, _ = _arrays(jnp.float32)
    with pytest.raises(ValueError, match=r"group rows \(100, 92\) must fill whole blocks of 64 rows"):
        fused_qkv.norm_qkv(*args, (100, 92), EPS, True)


def test_a_block_with_the_attention_kernels_computes_the_same_block():
    """Groups that fill whole row blocks take `fused_qkv` and `fused_proj` (with the MLP branch's
    kernels): the block is the same block."""
    layout = TokenLayout((GroupLayout(batch=32, tokens=4, valid=3), GroupLayout(batch=32, tokens=2, valid=2)))
    assert_block_matches_without_kernels(layout, jax.random.uniform(jax.random.key(2), (2, 64)) < 0.8, DIM)
