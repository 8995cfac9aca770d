import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dino_jax import optim, schedules
from dino_jax.models import stacking
from tests.optional_torch import torch


def make_params(rng):
    return {
        "backbone": {
            "pos_embed": rng.normal(size=(1, 5, 4)).astype(np.float32),
            "fc": {
                "kernel": rng.normal(size=(4, 6)).astype(np.float32),
                "bias": rng.normal(size=(6,)).astype(np.float32),
            },
            "norm": {"scale": rng.normal(size=(4,)).astype(np.float32)},
            # Stacked like the ViT's blocks (models/stacking.py): two blocks' tensors per leaf.
            "blocks": {
                "fc": {
                    "kernel": rng.normal(size=(2, 4, 6)).astype(np.float32),
                    "bias": rng.normal(size=(2, 6)).astype(np.float32),
                },
                "norm": {"scale": rng.normal(size=(2, 4)).astype(np.float32)},
            },
        },
        "head": {
            "last_layer": {
                "weight_v": rng.normal(size=(6, 3)).astype(np.float32),
                "weight_g": np.ones((1, 3), np.float32),
            }
        },
    }


def test_groups_follow_get_params_groups():
    params = make_params(np.random.default_rng(0))
    decayed = {
        optim.path_name(p): v for p, v in jax.tree_util.tree_flatten_with_path(optim.decay_mask(params))[0]
    }
    assert (
        decayed["backbone.pos_embed"]
        and decayed["backbone.fc.kernel"]
        and decayed["head.last_layer.weight_v"]
    )
    assert not decayed["backbone.fc.bias"] and not decayed["backbone.norm.scale"]
    # A stacked leaf holds one tensor per block: 2-D blocks decay, 1-D ones and biases do not.
    assert decayed["backbone.blocks.fc.kernel"]
    assert not decayed["backbone.blocks.fc.bias"] and not decayed["backbone.blocks.norm.scale"]
    labels = {
        optim.path_name(p): v
        for p, v in jax.tree_util.tree_flatten_with_path(optim.param_labels(params, norm_last_layer=True))[0]
    }
    assert labels["head.last_layer.weight_g"] == optim.GROUP_FIXED
    assert labels["head.last_layer.weight_v"] == optim.GROUP_LAST_LAYER
    assert labels["backbone.fc.kernel"] == optim.GROUP_MAIN
    labels = optim.param_labels(params, norm_last_layer=False)
    assert labels["head"]["last_layer"]["weight_g"] == optim.GROUP_LAST_LAYER


def test_clip_is_per_tensor_not_global():
    grads = {"big": jnp.full((4,), 3.0), "small": jnp.full((4,), 0.1)}  # norms 6 and 0.2
    clipped, _ = optim.clip_by_tensor_norm(3.0).update(grads, optax.EmptyState())
    assert float(jnp.linalg.norm(clipped["big"])) == pytest.approx(3.0 * 6 / (6 + 1e-6), rel=1e-6)
    np.testing.assert_array_equal(np.asarray(clipped["small"]), np.asarray(grads["small"]))
    # Each block of a stacked leaf is clipped on its own, as the reference's separate tensors are.
    stacked = {"blocks": {"w": jnp.stack([jnp.full((4,), 3.0), jnp.full((4,), 0.1)])}}
    clipped, _ = optim.clip_by_tensor_norm(3.0).update(stacked, optax.EmptyState())
    blocks = np.asarray(clipped["blocks"]["w"])
    assert float(np.linalg.norm(blocks[0])) == pytest.approx(3.0 * 6 / (6 + 1e-6), rel=1e-6)
    np.testing.assert_array_equal(blocks[1], np.asarray(stacked["blocks"]["w"][1]))


def per_block_names(tree) -> dict[str, np.ndarray]:
    """`{name: array}` with stacked leaves split into their blocks (`backbone.blocks.0.fc.kernel`):
    the separate tensors the reference has."""
    flat = {
        tuple(optim.path_name(p).split(".")): np.asarray(v)
        for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]
    }
    return {".".join(map(str, path)): v for path, v in stacking.per_block(flat).items()}


def run_reference(params, grads_per_step, lr, wd, clip, freeze_steps, norm_last_layer):
    """The reference's loop (its iteration order and optimiser: docs/reference.md) with torch.optim.AdamW."""
    flat = per_block_names(params)
    tensors = {
        n: torch.tensor(v, requires_grad=not (norm_last_layer and n.endswith("weight_g")))
        for n, v in flat.items()
    }
    trainable = {n: t for n, t in tensors.items() if t.requires_grad}
    regularized = [t for n, t in trainable.items() if not (n.endswith("bias") or t.ndim == 1)]
    not_regularized = [t for n, t in trainable.items() if n.endswith("bias") or t.ndim == 1]
    opt = torch.optim.AdamW([{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}])
    for step, grads in enumerate(grads_per_step):
        for i, group in enumerate(opt.param_groups):
            group["lr"] = lr[step]
            if i == 0:
                group["weight_decay"] = wd[step]
        opt.zero_grad()
        block_grads = per_block_names(grads)
        for n, t in trainable.items():
            t.grad = torch.tensor(block_grads[n])
        for t in trainable.values():  # utils.clip_gradients
            norm = t.grad.norm(2)
            coef = clip / (norm + 1e-6)
            if coef < 1:
                t.grad.mul_(coef)
        if step < freeze_steps:  # cancel_gradients_last_layer
            for n, t in trainable.items():
                if "last_layer" in n:
                    t.grad = None
        opt.step()
    return {n: t.detach().numpy() for n, t in tensors.items()}


@pytest.mark.torch
@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_update_rule_matches_torch_adamw_with_groups_clip_and_freeze(norm_last_layer):
    rng = np.random.default_rng(0)
    params = make_params(rng)
    steps, freeze_steps = 7, 3
    lr = schedules.cosine_schedule(1e-2, 1e-4, epochs=1, steps_per_epoch=steps, warmup_epochs=0)
    wd = schedules.cosine_schedule(0.04, 0.4, epochs=1, steps_per_epoch=steps)
    names = [optim.path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    grads_per_step = [
        {
            n: (rng.normal(size=np.shape(v)) * 4).astype(np.float32)
            for n, v in zip(names, jax.tree.leaves(params))
        }
        for _ in range(steps)
    ]

    tx = optim.make_optimizer(
        lr_fn=lambda c: schedules.lookup(lr, c),
        weight_decay_fn=lambda c: schedules.lookup(wd, c),
        clip_grad=3.0,
        freeze_last_layer_steps=freeze_steps,
        norm_last_layer=norm_last_layer,
    )
    ours = jax.tree.map(jnp.asarray, params)
    opt_state = tx.init(ours)
    treedef = jax.tree.structure(params)
    history = []
    for grads in grads_per_step:
        g = jax.tree.unflatten(treedef, [grads[n] for n in names])
        updates, opt_state = tx.update(g, opt_state, ours)
        ours = optax.apply_updates(ours, updates)
        history.append(np.asarray(ours["head"]["last_layer"]["weight_v"]))

    expected = run_reference(
        params,
        [jax.tree.unflatten(treedef, [g[n] for n in names]) for g in grads_per_step],
        lr,
        wd,
        3.0,
        freeze_steps,
        norm_last_layer,
    )
    for name, leaf in per_block_names(ours).items():
        np.testing.assert_allclose(
            leaf, expected[name], rtol=1e-6, atol=1e-6, err_msg=name
        )  # a few float32 ulps at |x|~1
    # The last layer did not move while frozen and moved after.
    np.testing.assert_array_equal(history[freeze_steps - 1], params["head"]["last_layer"]["weight_v"])
    assert not np.allclose(history[freeze_steps], history[freeze_steps - 1])


def test_ema_with_momentum_one_keeps_the_teacher():
    teacher = {"w": jnp.arange(3.0)}
    student = {"w": jnp.ones(3) * 7}
    np.testing.assert_array_equal(np.asarray(optim.ema(teacher, student, 1.0)["w"]), np.arange(3.0))
    np.testing.assert_allclose(
        np.asarray(optim.ema(teacher, student, 0.9)["w"]), 0.9 * np.arange(3.0) + 0.7, rtol=1e-6
    )


@pytest.mark.parametrize("step", [3, 12])  # during and after a 5-step last-layer freeze
def test_set_schedule_step_moves_every_schedule_the_applied_update_reads(step):
    # A resumed run (train.init_from) must apply lr[step] and wd[step], not step 0's. With zero
    # gradients Adam's direction is 0, so the update is the decoupled decay alone: -lr * wd * theta.
    lr_table = np.linspace(1e-2, 2e-2, 20, dtype=np.float32)
    wd_table = np.linspace(0.04, 0.4, 20, dtype=np.float32)
    freeze = 5
    tx = optim.make_optimizer(
        lr_fn=lambda count: schedules.lookup(lr_table, count),
        weight_decay_fn=lambda count: schedules.lookup(wd_table, count),
        clip_grad=3.0,
        freeze_last_layer_steps=freeze,
        norm_last_layer=True,
    )
    params = make_params(np.random.default_rng(0))
    opt_state = optim.set_schedule_step(tx.init(params), step, freeze)
    zeros = jax.tree.map(np.zeros_like, params)
    updates, _ = tx.update(zeros, opt_state, params)
    decay = -lr_table[step] * wd_table[step]
    np.testing.assert_allclose(
        updates["backbone"]["fc"]["kernel"], decay * params["backbone"]["fc"]["kernel"], rtol=1e-6
    )
    np.testing.assert_array_equal(updates["backbone"]["fc"]["bias"], 0.0)  # not decayed
    last_layer = updates["head"]["last_layer"]["weight_v"]
    if step < freeze:
        np.testing.assert_array_equal(last_layer, 0.0)  # held
    else:
        np.testing.assert_allclose(last_layer, decay * params["head"]["last_layer"]["weight_v"], rtol=1e-6)
