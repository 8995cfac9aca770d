"""float16 compute with dynamic loss scaling: a step whose gradients overflow is skipped the way
PyTorch's GradScaler skips `optimizer.step`, the scale follows GradScaler's rule, and the scale is
part of the checkpointed state. bfloat16/float32 carry no loss scale."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dino_jax import checkpointing, loss_scale, optim
from dino_jax.hooks import guards
from tests import train_helpers as th


@functools.cache
def fp16_parts():
    """Built once for the module: the jitted step compiles once."""
    config = th.tiny_config(**{"model.dtype": "float16", "train.freeze_last_layer": 1})
    parts, mesh = th.build(config, num_train_examples=48)  # 3 steps an epoch: frozen for 3 steps
    return config, parts, mesh


def with_scale(state, scale):
    return state.replace(
        loss_scale=loss_scale.LossScale(jnp.asarray(scale, jnp.float32), jnp.asarray(0, jnp.int32))
    )


def schedule_counters(node) -> list[int]:
    """Every counter-only NamedTuple (the lr and weight-decay schedules) and the hold's count."""
    if isinstance(node, tuple) and getattr(node, "_fields", None) == ("count",):
        return [int(node.count)]
    found = [int(node.count)] if isinstance(node, optim.HoldState) else []
    children = node.values() if hasattr(node, "values") else node if isinstance(node, (tuple, list)) else ()
    for child in children:
        if isinstance(node, optim.HoldState) and child is node.count:
            continue
        found += schedule_counters(child)
    return found


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_only_float16_carries_a_loss_scale():
    for dtype in ("float32", "bfloat16"):
        assert loss_scale.initial(dtype) is None
    _, parts, _ = fp16_parts()
    assert float(parts.state.loss_scale.scale) == loss_scale.INITIAL_SCALE == 2.0**16


def test_an_overflowing_float16_step_keeps_student_and_moments_and_moves_the_schedules():
    config, parts, mesh = fp16_parts()
    before = with_scale(parts.state, 2.0**100)  # the scaled cotangents overflow float16
    after, metrics = parts.step_fn(jax.tree.map(jnp.copy, before), th.fixed_batch(config))

    assert float(metrics["skipped_step"]) == 1.0
    assert int(after.step) == 1
    for a, b in zip(leaves(after.student), leaves(before.student)):
        np.testing.assert_array_equal(a, b)
    # Adam's moments and counts unchanged; only counters that are schedules (and the hold) moved.
    mu_nu_after = [x for x in leaves(after.opt_state) if x.ndim]
    mu_nu_before = [x for x in leaves(before.opt_state) if x.ndim]
    for a, b in zip(mu_nu_after, mu_nu_before):
        np.testing.assert_array_equal(a, b)
    assert schedule_counters(before.opt_state) == [0] * len(schedule_counters(before.opt_state))
    # main lr + wd at 1, the hold's count at 1, the held group's schedules still 0 (frozen 3 steps)
    assert sorted(schedule_counters(after.opt_state)) == [0, 0, 1, 1, 1]
    assert float(after.loss_scale.scale) == 2.0**99 and int(after.loss_scale.good_steps) == 0
    # As in the reference's skipped steps, the center still follows the (finite) teacher output.
    assert not np.array_equal(np.asarray(after.center), np.asarray(before.center))


def test_a_finite_float16_step_applies_nearly_the_float32_update():
    config, parts16, mesh = fp16_parts()
    parts32, _ = th.build(th.tiny_config(**{"train.freeze_last_layer": 1}), num_train_examples=48)
    batch = th.fixed_batch(config)
    state16 = with_scale(parts16.state, 2.0**4)
    start = leaves(state16.student)
    after16, metrics16 = parts16.step_fn(jax.tree.map(jnp.copy, state16), batch)
    after32, metrics32 = parts32.step_fn(parts32.state, batch)

    assert float(metrics16["skipped_step"]) == 0.0
    assert float(after16.loss_scale.scale) == 2.0**4 and int(after16.loss_scale.good_steps) == 1
    assert float(metrics16["loss"]) == pytest.approx(float(metrics32["loss"]), rel=1e-3)
    # Unscaled before clipping and the optimiser (Adam alone would hide a missing unscale).
    assert float(metrics16["grad_norm"]) == pytest.approx(float(metrics32["grad_norm"]), rel=2e-2)
    update16 = np.concatenate([(a - s).ravel() for a, s in zip(leaves(after16.student), start)])
    update32 = np.concatenate([(a - s).ravel() for a, s in zip(leaves(after32.student), start)])
    cosine = update16 @ update32 / (np.linalg.norm(update16) * np.linalg.norm(update32))
    assert cosine > 0.95, cosine
    assert sorted(schedule_counters(after16.opt_state)) == [0, 0, 1, 1, 1]


def test_scale_rule_is_gradscalers():
    state = loss_scale.initial("float16")
    state = loss_scale.adjust(state, jnp.asarray(False))
    assert float(state.scale) == 2.0**15 and int(state.good_steps) == 0
    for _ in range(loss_scale.GROWTH_PERIOD - 1):
        state = loss_scale.adjust(state, jnp.asarray(True))
    assert float(state.scale) == 2.0**15 and int(state.good_steps) == loss_scale.GROWTH_PERIOD - 1
    state = loss_scale.adjust(state, jnp.asarray(True))
    assert float(state.scale) == 2.0**16 and int(state.good_steps) == 0
    low = loss_scale.LossScale(jnp.asarray(1.0), jnp.asarray(5, jnp.int32))
    assert float(loss_scale.adjust(low, jnp.asarray(False)).scale) == loss_scale.MIN_SCALE


def test_the_guard_lets_a_skipped_float16_step_pass_until_the_scale_is_at_its_minimum():
    guards.check_finite(7, {"loss": float("inf"), "loss_scale": 1024.0, "skipped_step": 1.0})
    with pytest.raises(guards.NonFiniteLossError, match="forward pass itself overflows float16"):
        guards.check_finite(7, {"loss": float("nan"), "loss_scale": 1.0, "skipped_step": 1.0})
    with pytest.raises(guards.NonFiniteLossError, match="loss is nan at step 7"):
        guards.check_finite(7, {"loss": float("nan")})


def test_the_loss_scale_is_checkpointed_with_the_state(tmp_path):
    _, parts, _ = fp16_parts()
    state = parts.state.replace(
        loss_scale=loss_scale.LossScale(jnp.asarray(512.0, jnp.float32), jnp.asarray(37, jnp.int32))
    )
    saver = checkpointing.Checkpointer(str(tmp_path / "ckpt"))
    saver.save(5, state, force=True)
    saver.wait()
    restored = saver.restore(checkpointing.abstract_like(parts.state))
    saver.close()
    assert float(restored.loss_scale.scale) == 512.0 and int(restored.loss_scale.good_steps) == 37
