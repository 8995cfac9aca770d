import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests import train_helpers as th

# Pinned metrics of the first step of digits:smoke on `fixed_batch` (seed 0). A change in any of
# the model, loss, optimiser or initialisation numerics moves them: if that change is intended,
# re-pin them with the values the failure prints, and say why in the commit.
GOLDEN_FIRST_STEP = {
    # Re-pinned when stochastic depth became one draw per step (models/block.py,
    # draw_drop_path_masks) instead of a key per block and crop group: other images are dropped;
    # with drop_path_rate 0 the first step is the same as before (loss 6.0106201 -> 6.0106192).
    "loss": 6.169888973236084,
    "grad_norm": 56.46479415893555,
    "update_norm": 0.024244213476777077,
    "param_norm": 25.555221557617188,
}


def first_step_metrics():
    # Drop path set here, not inherited from the recipe: the pin covers the student's stochastic
    # depth, and a recipe change must not move it.
    config = th.tiny_config(**{"model.drop_path_rate": 0.1})
    parts, mesh = th.build(config)
    _, history = th.run_steps(parts, mesh, [th.fixed_batch(config)])
    return history[0]


def test_golden_first_step():
    metrics = first_step_metrics()
    got = {k: metrics[k] for k in GOLDEN_FIRST_STEP}
    print("first-step metrics:", json.dumps(got))
    for key, expected in GOLDEN_FIRST_STEP.items():
        # Adam's first step is about +-lr on every entry whose gradient is far above eps, including
        # entries whose exact gradient is 0 (the key bias, biases before BatchNorm) where rounding
        # alone sets it: the update's norm moves by up to ~1e-4 with any change of summation order
        # (an erf instead of an erfc GELU moved it 3e-5), while the loss moves by ~1e-6.
        rel = 2e-4 if key == "update_norm" else 2e-5
        assert metrics[key] == pytest.approx(expected, rel=rel), (
            f"{key}: got {metrics[key]!r}, pinned {expected!r}"
        )


def leaf(state_params, *path):
    node = state_params
    for key in path:
        node = node[key]
    return np.asarray(getattr(node, "value", node))


def test_last_layer_is_frozen_for_the_first_epoch_then_moves():
    # 48 examples / batch 16 = 3 steps an epoch; freeze for 1 epoch.
    config = th.tiny_config(**{"train.freeze_last_layer": 1})
    parts, mesh = th.build(config, num_train_examples=48)
    assert parts.plan.freeze_last_layer_steps == 3
    initial_v = leaf(parts.state.student, "head", "last_layer", "weight_v").copy()
    initial_kernel = leaf(parts.state.student, "backbone", "norm", "scale").copy()
    batches = [th.fixed_batch(config, seed=i) for i in range(4)]
    state, _ = th.run_steps(parts, mesh, batches[:3])
    np.testing.assert_array_equal(leaf(state.student, "head", "last_layer", "weight_v"), initial_v)
    np.testing.assert_array_equal(leaf(state.teacher, "head", "last_layer", "weight_v"), initial_v)
    assert not np.allclose(leaf(state.student, "backbone", "norm", "scale"), initial_kernel)
    parts.state = state
    state, _ = th.run_steps(parts, mesh, batches[3:])
    assert not np.allclose(leaf(state.student, "head", "last_layer", "weight_v"), initial_v)
    # norm_last_layer keeps g at 1 in both networks.
    np.testing.assert_array_equal(leaf(state.student, "head", "last_layer", "weight_g"), 1.0)
    np.testing.assert_array_equal(leaf(state.teacher, "head", "last_layer", "weight_g"), 1.0)


def test_teacher_momentum_one_leaves_the_teacher_unchanged():
    config = th.tiny_config(**{"train.momentum_teacher": 1.0})
    parts, mesh = th.build(config)
    teacher_before = jax.tree.map(np.asarray, parts.state.teacher)
    student_before = jax.tree.map(np.asarray, parts.state.student)
    state, _ = th.run_steps(parts, mesh, [th.fixed_batch(config, seed=i) for i in range(2)])
    for before, after in zip(jax.tree.leaves(teacher_before), jax.tree.leaves(state.teacher)):
        np.testing.assert_array_equal(np.asarray(after), before)
    moved = [
        not np.allclose(np.asarray(a), b)
        for b, a in zip(jax.tree.leaves(student_before), jax.tree.leaves(state.student))
    ]
    assert any(moved)


def test_teacher_follows_the_updated_student_by_ema():
    config = th.tiny_config(**{"train.momentum_teacher": 0.5})
    parts, mesh = th.build(config)
    teacher_before = jax.tree.map(np.asarray, parts.state.teacher)
    # Momentum is a cosine from 0.5 to 1 over the run; read the value used at step 0.
    m = float(parts.schedules.momentum[0])
    state, _ = th.run_steps(parts, mesh, [th.fixed_batch(config)])
    for t0, s1, t1 in zip(
        jax.tree.leaves(teacher_before), jax.tree.leaves(state.student), jax.tree.leaves(state.teacher)
    ):
        np.testing.assert_allclose(np.asarray(t1), m * t0 + (1 - m) * np.asarray(s1), rtol=1e-5, atol=1e-7)


def test_center_moves_towards_the_teacher_output():
    config = th.tiny_config()
    parts, mesh = th.build(config)
    state, _ = th.run_steps(parts, mesh, [th.fixed_batch(config)])
    center = np.asarray(state.center)
    assert center.shape == (1, config.head.out_dim)
    assert np.abs(center).max() > 0


SHARDED_SCRIPT = r"""
import json, sys
import jax, numpy as np
from tests import train_helpers as th
config = th.tiny_config()
parts, mesh = th.build(config)
assert len(mesh.devices.flat) == jax.device_count(), "the mesh must span every device"
from dino_jax import sharding as sharding_lib
compiled = parts.step_fn.lower(parts.state, sharding_lib.to_global_batch(th.fixed_batch(config), mesh)).compile()
temp_bytes = compiled.memory_analysis().temp_size_in_bytes
gathers = compiled.as_text().count(" all-gather(") + compiled.as_text().count(" all-gather-start(")
state, history = th.run_steps(parts, mesh, [th.fixed_batch(config, seed=i) for i in range(2)])
# Compared through outputs, not raw parameters: with BatchNorm in the head several parameters
# (pre-BN biases, the final-norm bias, the key bias) have an exactly-zero true gradient, and Adam
# turns float noise into +-lr steps that differ with the reduction layout but change no output.
from flax import nnx
from dino_jax import train_step
probe = th.fixed_batch(config, seed=99)
crops = [train_step.crop_major(jax.numpy.asarray(probe["global_crops"])).astype("float32") / 255.0]
student_logits = np.asarray(jax.jit(lambda p, c: nnx.merge(parts.graphdef, p)(c))(state.student, crops))
teacher_logits = np.asarray(jax.jit(lambda p, c: nnx.merge(parts.graphdef, p)(c))(state.teacher, crops))
print("RESULT" + json.dumps({"devices": jax.device_count(), "temp_bytes": temp_bytes, "gathers": gathers, "history": history, "student": student_logits[:8].tolist(), "teacher": teacher_logits[:8].tolist(),
      "center": np.asarray(state.center).ravel()[:50].tolist()}))
"""


def run_with_devices(count):
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={count}",
        JAX_PLATFORMS="cpu",
        JAX_DISABLE_MOST_OPTIMIZATIONS="1",  # a tiny model: compile time dominates
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-c", SHARDED_SCRIPT], cwd=root, env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT") :])


def test_one_device_and_eight_devices_take_the_same_step():
    one, eight = run_with_devices(1), run_with_devices(8)
    assert one["devices"] == 1 and eight["devices"] == 8
    for a, b in zip(one["history"], eight["history"]):
        for key in a:
            # Adam's first steps divide by sqrt(v) ~ |g|: the last-bit differences of a reduction
            # split over 8 devices are amplified in the update's norm, not in the parameters.
            rel = 1e-3 if key == "update_norm" else 1e-5
            assert a[key] == pytest.approx(b[key], rel=rel, abs=1e-6), key
    np.testing.assert_allclose(one["student"], eight["student"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(one["teacher"], eight["teacher"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(one["center"], eight["center"], rtol=1e-5, atol=1e-6)
    # Data parallel: each device works on its eighth of the batch. When the crops were reordered
    # across the device split, XLA gathered the whole batch onto every device (each one then held
    # the temporaries of all of it).
    assert eight["temp_bytes"] < one["temp_bytes"] / 3, (one["temp_bytes"], eight["temp_bytes"])
