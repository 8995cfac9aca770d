"""The GPU forms of the DINO head's last layer and of the loss, run here on the CPU.

`lax.platform_dependent` picks them when lowering for CUDA (models/head.py `half_precision_logits`;
losses.py's one-pass teacher softmax and cross-entropy). `as_lowered_for("cuda")` makes it pick the
CUDA branch while a test traces, so the very code an H100 compiles runs on the CPU:
- in float32 the GPU forms agree with the CPU forms to float32 rounding: gradients within 1e-5 of
  their largest entry, the loss within 3e-5 (measured 1e-5), the entropy monitors within 1e-5 of
  float64's (the CPU form's within 1e-2);
- with 16-bit products the GPU form's float16 logits (the reference's under PyTorch autocast) add
  nothing visible to the error bfloat16 products already make: head + loss gradients within 3% of
  their largest entry of float32's (measured 0.3-0.9%, as the CPU's bfloat16 form), the loss within
  5e-4 relative (measured 2e-4; the CPU's bfloat16 form 1e-4). bfloat16 logits would have doubled
  the gradients' error and quadrupled the loss's.
"""

import contextlib
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dino_jax import losses
from dino_jax.models import head

pytestmark = pytest.mark.usefixtures("fast_compilation")


@contextlib.contextmanager
def as_lowered_for(platform: str):
    """`lax.platform_dependent` takes `platform`'s branch (else `default`) while tracing."""

    def pick(*args, default=None, **branches):
        return branches.get(platform, default)(*args)

    with mock.patch.object(jax.lax, "platform_dependent", pick):
        yield


def trained_like_problem(noise: float, *, batch=8, crops=6, k=4096, dim=256, seed=0):
    """Unit features near one prototype column each (cosines up to ~0.9, as after training): the
    teacher at temperature 0.04 is then peaked, where float16/bfloat16 rounding shows most."""
    rng = np.random.default_rng(seed)
    v = (rng.standard_normal((dim, k)) / np.sqrt(dim)).astype(np.float32)
    prototypes = (v / np.linalg.norm(v, axis=0))[:, rng.integers(0, k, batch)].T

    def views(count):
        x = prototypes[None] + noise * rng.standard_normal((count, batch, dim)) / np.sqrt(dim)
        return (x / np.linalg.norm(x, axis=-1, keepdims=True)).reshape(count * batch, dim).astype(np.float32)

    g = np.ones((1, k), np.float32)
    center = (0.01 * rng.standard_normal((1, k))).astype(np.float32)
    return views(crops), views(2), v, g, center, crops


def head_and_loss(problem, dtype, platform):
    """Loss, monitors and the gradients w.r.t. the last layer's input and weight_v."""
    student_x, teacher_x, v, g, center, crops = problem

    def loss_fn(student_x, v):
        with as_lowered_for(platform):
            student = head.weight_norm_linear(student_x, v, g, dtype)
            teacher = jax.lax.stop_gradient(head.weight_norm_linear(teacher_x, v, g, dtype))
            return losses.dino_loss(student, teacher, center, num_crops=crops, teacher_temperature=0.04)

    (loss, monitors), grads = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(student_x, v)
    return float(loss), {k: float(m) for k, m in monitors.items()}, [np.asarray(d) for d in grads]


def float64_monitors(problem):
    _, teacher_x, v, g, center, _ = (
        np.asarray(a, np.float64) if isinstance(a, np.ndarray) else a for a in problem
    )
    teacher = (teacher_x @ (v * g / np.linalg.norm(v, axis=0, keepdims=True)) - center) / 0.04
    probs = np.exp(teacher - teacher.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    mean_probs = probs.mean(0)
    return {
        "teacher_entropy": -np.sum(probs * np.log(probs), -1).mean(),
        "teacher_batch_entropy": -np.sum(mean_probs * np.log(mean_probs)),
    }


def relative_to_largest(got, want):
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("noise", [0.3, 1.0, 5.0])
def test_float32_gpu_forms_match_the_cpu_forms(noise):
    problem = trained_like_problem(noise)
    loss, monitors, grads = head_and_loss(problem, jnp.float32, "cuda")
    expected_loss, expected_monitors, expected_grads = head_and_loss(problem, jnp.float32, "cpu")
    # The GPU form sums the teacher-weighted logits (|s| ~ 10) straight; run as one sequential sum
    # (as XLA:CPU runs the variadic reduce) it loses ~1e-5 of the loss to rounding.
    assert loss == pytest.approx(expected_loss, abs=3e-5)
    # The entropies: within 1e-5 of float64's. The CPU form's sum of q log q is 4e-3 off for a
    # peaked teacher (entropy 1.2e-5), the one-pass form sums the tail apart from the max.
    for key, value in float64_monitors(problem).items():
        assert monitors[key] == pytest.approx(value, rel=1e-5), key
        assert expected_monitors[key] == pytest.approx(value, rel=1e-2), key
    for name, got, want in zip(("x", "v"), grads, expected_grads):
        assert relative_to_largest(got, want) < 1e-5, f"gradient of {name}"


def test_gpu_form_monitors_tell_uniform_from_one_hot():
    k = 16
    with as_lowered_for("cuda"):
        _, uniform = losses.dino_loss(
            np.zeros((4, k), np.float32), np.zeros((4, k), np.float32), np.zeros((1, k)), num_crops=2,
            teacher_temperature=0.04,
        )  # fmt: skip
        one_hot_logits = np.where(np.arange(k) == 3, 1.0, 0.0)[None].repeat(4, 0).astype(np.float32)
        _, one_hot = losses.dino_loss(
            np.zeros((4, k), np.float32),
            one_hot_logits,
            np.zeros((1, k)),
            num_crops=2,
            teacher_temperature=0.01,
        )
    assert uniform["teacher_entropy"] == pytest.approx(np.log(k), rel=1e-6)
    assert uniform["teacher_batch_entropy"] == pytest.approx(np.log(k), rel=1e-6)
    # exp(-100) = 4e-44 of tail mass per entry: entropies ~1e-41, not 0 minus rounding noise.
    assert 0.0 <= one_hot["teacher_entropy"] < 1e-30
    assert one_hot["teacher_batch_entropy"] < 1e-30


@pytest.mark.parametrize("noise", [0.3, 1.0, 5.0])
def test_sixteen_bit_gpu_form_stays_within_the_error_of_bfloat16_products(noise):
    problem = trained_like_problem(noise)
    expected_loss, _, expected_grads = head_and_loss(problem, jnp.float32, "cpu")
    loss, _, grads = head_and_loss(problem, jnp.bfloat16, "cuda")
    _, _, cpu_grads = head_and_loss(problem, jnp.bfloat16, "cpu")
    assert loss == pytest.approx(expected_loss, rel=5e-4)
    for name, got, cpu, want in zip(("x", "v"), grads, cpu_grads, expected_grads):
        error, cpu_error = relative_to_largest(got, want), relative_to_largest(cpu, want)
        assert error < 3e-2, f"gradient of {name}: {error:.2e} of its largest entry"
        assert error < 1.5 * cpu_error + 1e-3, (
            f"gradient of {name}: {error:.2e} vs bfloat16 products' {cpu_error:.2e}"
        )
    # float16 products (T4/V100 with loss scaling): ~4x closer still.
    _, _, f16_grads = head_and_loss(problem, jnp.float16, "cuda")
    for name, got, want in zip(("x", "v"), f16_grads, expected_grads):
        assert relative_to_largest(got, want) < 5e-3, f"float16 gradient of {name}"


def test_half_precision_logits_hold_float16_values_of_the_scaled_product():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    v = rng.standard_normal((32, 300)).astype(np.float32)
    g = rng.uniform(0.5, 2.0, (1, 300)).astype(np.float32)
    scale = g / np.linalg.norm(v, axis=0, keepdims=True)
    y = np.asarray(head.half_precision_logits(x, v, scale, jnp.bfloat16))
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, y.astype(np.float16).astype(np.float32))
    np.testing.assert_allclose(y, x @ (v * scale), atol=1e-2 * np.abs(g).max())
    # Beyond float16's range the logits saturate instead of turning into inf.
    huge = np.asarray(head.half_precision_logits(x, v, scale * 1e6, jnp.bfloat16))
    assert np.isfinite(huge).all() and np.abs(huge).max() == np.finfo(np.float16).max


def test_the_cuda_lowering_takes_the_gpu_forms_and_the_cpu_lowering_does_not():
    batch, crops, k, dim = 2, 4, 256, 16

    def step(student_x, teacher_x, v, g, center):
        def loss_fn(student_x, v):
            student = head.weight_norm_linear(student_x, v, g, jnp.bfloat16)
            teacher = jax.lax.stop_gradient(head.weight_norm_linear(teacher_x, v, g, jnp.bfloat16))
            return losses.dino_loss(student, teacher, center, num_crops=crops, teacher_temperature=0.04)

        return jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(student_x, v)

    shapes = [(crops * batch, dim), (2 * batch, dim), (dim, k), (1, k), (1, k)]
    args = [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in shapes]
    text = {
        platform: jax.export.export(jax.jit(step), platforms=[platform])(*args).mlir_module()
        for platform in ("cpu", "cuda", "tpu")
    }
    # log1p ends the one-pass softmax statistics; float16 holds the 16-bit GPU form's logits.
    assert "log_plus_one" in text["cuda"] and "xf16>" in text["cuda"]
    for platform in ("cpu", "tpu"):
        assert "log_plus_one" not in text[platform] and "xf16>" not in text[platform]
