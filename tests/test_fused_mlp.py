"""The MLP branch's Pallas kernels (dino_jax/models/fused_mlp.py): their arithmetic, run in Pallas'
interpreter on the CPU against the XLA form, and their lowering to Triton for a GPU that is not here."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from dino_jax import config_validation
from dino_jax.config import ConfigError
from dino_jax.configs import digits
from dino_jax.models import fused_mlp
from dino_jax.models.block import Block, GroupLayout, TokenLayout
from dino_jax.models.fused_grads import gelu
from dino_jax.models.vit import VisionTransformer, ViTConfig
from tests.pallas_helpers import assert_as_close_to_float32_as_xla, assert_same_in_float32

# Rows not a multiple of the kernels' row block, D not a power of two (read as 64 columns, the rest
# masked), two chunks of the hidden layer: every edge the kernels mask.
ROWS, DIM, HIDDEN, EPS = 100, 48, 2 * fused_mlp.HIDDEN_CHUNK, 1e-6


def _arrays(dtype, rows=ROWS, dim=DIM, hidden=HIDDEN, drop_path=True):
    keys = jax.random.split(jax.random.key(0), 9)
    # An offset mean and a spread of scales per row: the norm's statistics must be the row's own.
    x = jax.random.normal(keys[0], (rows, dim)) * jnp.linspace(0.5, 3.0, rows)[:, None] + 1.0
    scale = 1.0 + 0.2 * jax.random.normal(keys[1], (dim,))
    bias = 0.1 * jax.random.normal(keys[2], (dim,))
    w1 = jax.random.normal(keys[3], (dim, hidden)) * dim**-0.5
    b1 = jax.random.normal(keys[4], (hidden,)) * 0.1
    w2 = jax.random.normal(keys[5], (hidden, dim)) * hidden**-0.5
    b2 = jax.random.normal(keys[6], (dim,)) * 0.1
    factor = (jax.random.uniform(keys[7], (rows,)) < 0.75).astype(jnp.float32) / 0.75 if drop_path else None
    dout = jax.random.normal(keys[8], (rows, dim)).astype(dtype)
    low = tuple(a.astype(dtype) for a in (w1, b1, w2, b2))
    return (x.astype(dtype), scale, bias, *low, factor), dout


def _value_and_grads(function, args, dout):
    y, vjp = jax.vjp(function, *args)
    return (y, *vjp(dout)[:7])  # not the factors' (a constant of the step)


def _kernels(*args):
    return fused_mlp.mlp_branch(*args, EPS, True)


def _xla(*args):
    return fused_mlp.xla_mlp_branch(*args, EPS)


def test_gelu_without_erf_matches_the_erf_form_and_its_slope():
    h = jnp.linspace(-12.0, 12.0, 48001, dtype=jnp.float32)
    value, slope = fused_mlp._gelu_and_slope(h)
    np.testing.assert_allclose(value, gelu(h), atol=2e-6, rtol=0)
    np.testing.assert_allclose(slope, jax.vmap(jax.grad(gelu))(h), atol=1e-6, rtol=0)


@pytest.mark.parametrize("drop_path", [True, False])
def test_kernels_match_the_xla_form_in_float32(drop_path):
    args, dout = _arrays(jnp.float32, drop_path=drop_path)
    assert_same_in_float32(_value_and_grads(_kernels, args, dout), _value_and_grads(_xla, args, dout))


def test_kernels_in_bfloat16_are_as_close_to_float32_as_the_xla_form():
    args, dout = _arrays(jnp.bfloat16)
    as_float32 = tuple(None if a is None else a.astype(jnp.float32) for a in args)
    truth = _value_and_grads(_xla, as_float32, dout.astype(jnp.float32))
    ours = _value_and_grads(_kernels, args, dout)
    assert_as_close_to_float32_as_xla(truth, ours, _value_and_grads(_xla, args, dout))


@pytest.mark.parametrize("drop_path", [True, False])
def test_kernels_lower_to_triton_without_a_gpu(drop_path):
    """Triton takes power-of-two tiles only and has no erf: lowering the forward and backward for
    CUDA (which needs no GPU) catches a kernel it cannot take."""
    args, dout = _arrays(jnp.bfloat16, rows=70, dim=192, hidden=768, drop_path=drop_path)
    shapes = [None if a is None else jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (*args, dout)]

    def step(*arrays):
        *inputs, dout = arrays
        return _value_and_grads(lambda *a: fused_mlp.mlp_branch(*a, EPS), inputs, dout)

    text = jax.jit(step).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 2  # the forward kernel and the backward one


VIT = ViTConfig(image_size=8, patch_size=4, embed_dim=32, depth=1, num_heads=2, dtype="bfloat16")


def test_a_block_lowered_for_cuda_runs_its_mlp_branch_and_norm_as_pallas_kernels():
    block = Block(VIT, rngs=nnx.Rngs(0))
    layout = TokenLayout((GroupLayout(batch=2, tokens=5, valid=5),))
    x = jnp.zeros((layout.groups[0].rows, VIT.embed_dim), jnp.bfloat16)
    # With the kernels: the MLP branch's forward and backward, and the first pre-norm's backward.
    for pallas, calls in ((True, 3), (False, 0)):
        loss = lambda rows, p=pallas: jnp.sum(block(rows, layout, pallas=p).astype(jnp.float32))
        lowered = jax.jit(jax.grad(loss)).trace(x).lower(lowering_platforms=("cuda",))
        assert lowered.as_text().count("__gpu$xla.gpu.triton") == calls


def test_the_vit_takes_the_kernels_only_when_asked_and_able():
    assert not VisionTransformer(VIT, rngs=nnx.Rngs(0)).pallas_kernels_available()  # off by default
    assert VisionTransformer(
        dataclasses.replace(VIT, pallas_kernels=True), rngs=nnx.Rngs(0)
    ).pallas_kernels_available()
    odd_width = dataclasses.replace(VIT, pallas_kernels=True, mlp_ratio=2.5)  # 80 hidden: not whole chunks
    assert not VisionTransformer(odd_width, rngs=nnx.Rngs(0)).pallas_kernels_available()


def test_pallas_kernels_config_must_be_a_bool():
    config = digits.get_config()
    assert config.model.pallas_kernels is False
    as_dict = config.to_dict()
    as_dict["model"]["pallas_kernels"] = "yes"
    with pytest.raises(ConfigError, match="config.model.pallas_kernels = 'yes': expected True or False"):
        config_validation.validate(ml_collections.ConfigDict(as_dict))
