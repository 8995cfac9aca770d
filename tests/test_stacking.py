"""The ViT's blocks kept as one stack (dino_jax/models/stacking.py): a scan over the stack computes
what the blocks one after another do, the per-block view is the one the PyTorch key tables and
older checkpoints use, and a training checkpoint written before the stack (one entry per block)
still restores, with the training state it held."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dino_jax import checkpointing, sharding
from dino_jax.interop import load
from dino_jax.models import stacking
from dino_jax.models.vit import ViTConfig, VisionTransformer
from tests import train_helpers as th

pytestmark = pytest.mark.usefixtures("fast_compilation")

CONFIG = ViTConfig(image_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2, drop_path_rate=0.3)


def test_a_scan_over_the_stack_gives_the_features_and_gradients_of_the_blocks_one_by_one():
    images = jax.random.normal(jax.random.key(0), (8, 16, 16, 3))
    # A random projection of the features: a sum of their squares would be constant (final norm).
    weights = jax.random.normal(jax.random.key(2), (8, CONFIG.embed_dim))
    results = []
    for scan in (False, True):
        model = VisionTransformer(dataclasses.replace(CONFIG, scan_blocks=scan), rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(model, nnx.Param)

        @jax.jit
        def loss_and_grads(params, key, graphdef=graphdef):
            def loss(params):
                return jnp.sum(nnx.merge(graphdef, params)(images, drop_path_rng=key) * weights)

            return jax.value_and_grad(loss)(params)

        results.append(jax.device_get(loss_and_grads(params, jax.random.key(1))))
    (loop_loss, loop_grads), (scan_loss, scan_grads) = results
    # Stochastic depth drops the same rows in both (one draw for the whole network either way).
    assert scan_loss == pytest.approx(loop_loss, rel=1e-6)
    for (path, a), (_, b) in zip(nnx.to_flat_state(loop_grads), nnx.to_flat_state(scan_grads)):
        a, b = np.asarray(a[...]), np.asarray(b[...])
        # float32 rounding of another summation order, relative to the tensor's largest entry
        assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max(), path


def test_block_i_is_entry_i_of_every_stacked_parameter():
    model = VisionTransformer(CONFIG, rngs=nnx.Rngs(0))
    stacked = dict(nnx.to_flat_state(nnx.split(model.blocks)[1]))
    block = dict(nnx.to_flat_state(nnx.split(model.block(2))[1]))
    assert set(block) == set(stacked) and len(block) == 12
    for path, variable in block.items():
        np.testing.assert_array_equal(variable[...], stacked[path][...][2])
    # Blocks were initialised separately, not copied.
    assert not np.allclose(
        stacked[("attn", "qkv", "kernel")][...][0], stacked[("attn", "qkv", "kernel")][...][1]
    )


def test_the_per_block_view_and_its_inverse():
    flat = {
        ("backbone", "blocks", "attn", "qkv", "kernel"): np.arange(24.0).reshape(3, 2, 4),
        ("backbone", "cls_token"): np.ones((1, 1, 4)),
        ("head", "mlp", 0, "kernel"): np.zeros((4, 4)),  # numbered, but not a stack
    }
    split = stacking.per_block(flat)
    assert set(split) == {
        ("backbone", "blocks", 0, "attn", "qkv", "kernel"),
        ("backbone", "blocks", 1, "attn", "qkv", "kernel"),
        ("backbone", "blocks", 2, "attn", "qkv", "kernel"),
        ("backbone", "cls_token"),
        ("head", "mlp", 0, "kernel"),
    }
    np.testing.assert_array_equal(
        split[("backbone", "blocks", 1, "attn", "qkv", "kernel")], flat[flat_key()][1]
    )
    again = stacking.stacked(split, xp=np)
    assert set(again) == set(flat)
    for key, value in flat.items():
        np.testing.assert_array_equal(again[key], value)
    assert stacking.per_block_shapes({flat_key(): (3, 2, 4)}) == {
        ("backbone", "blocks", i, "attn", "qkv", "kernel"): (2, 4) for i in range(3)
    }
    with pytest.raises(ValueError, match="blocks \\[0, 2\\]"):
        stacking.stacked({("blocks", 0, "w"): np.zeros(2), ("blocks", 2, "w"): np.zeros(2)}, xp=np)


def flat_key():
    return ("backbone", "blocks", "attn", "qkv", "kernel")


def per_block_tree(tree) -> dict:
    """A state as orbax stored it before the stack: nested dicts, one entry per block."""
    flat = {
        tuple(checkpointing._name(path).split(".")): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }
    nested: dict = {}
    for path, value in stacking.per_block(flat).items():
        node = nested
        for key in path[:-1]:
            node = node.setdefault(str(key), {})
        node[str(path[-1])] = value
    return nested


def test_a_training_checkpoint_written_one_block_at_a_time_restores_onto_the_stack(tmp_path):
    config = th.tiny_config()
    parts, mesh = th.build(config)
    state, _ = th.run_steps(parts, mesh, [th.fixed_batch(config)])  # moments and counts non-zero
    old = per_block_tree(state)
    assert "0" in old["student"]["backbone"]["blocks"]
    saver = checkpointing.Checkpointer(str(tmp_path / "checkpoints"))
    saver.save(1, old, force=True)
    saver.close()

    restored = checkpointing.Checkpointer(str(tmp_path / "checkpoints")).restore(
        checkpointing.abstract_like(state)
    )
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(restored)[0], jax.tree.leaves(state)):
        if jax.dtypes.issubdtype(want.dtype, jax.dtypes.prng_key):
            got, want = jax.random.key_data(got), jax.random.key_data(want)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=checkpointing._name(path))
    # The restored state trains on.
    parts.step_fn(restored, sharding.to_global_batch(th.fixed_batch(config, seed=1), mesh))


def test_parameters_read_by_the_loaders_may_be_stored_one_block_at_a_time():
    vit = VisionTransformer(CONFIG, rngs=nnx.Rngs(0))
    _, params = nnx.split(vit, nnx.Param)
    old = per_block_tree(params)
    _, abstract = nnx.split(nnx.eval_shape(lambda: VisionTransformer(CONFIG, rngs=nnx.Rngs(1))), nnx.Param)
    filled = load._params_from_tree(abstract, old, "an old checkpoint")
    for (path, want), (_, got) in zip(nnx.to_flat_state(params), nnx.to_flat_state(filled)):
        np.testing.assert_array_equal(got[...], want[...], err_msg=str(path))


def test_build_training_state_has_stacked_blocks():
    parts, _ = th.build(th.tiny_config())
    qkv = parts.state.student["backbone"]["blocks"]["attn"]["qkv"]["kernel"][...]
    assert qkv.shape[0] == th.tiny_config().model.depth
    # The teacher starts as the student, block by block.
    np.testing.assert_array_equal(
        parts.state.teacher["backbone"]["blocks"]["attn"]["qkv"]["kernel"][...], qkv
    )
