import contextlib
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dino_jax import losses
from tests.test_head_loss_gpu_forms import as_lowered_for


def reference_loss(student, teacher, center, num_crops, teacher_temp, student_temp=0.1):
    """The reference's loop over (teacher view, student view) pairs, in numpy."""

    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    s = np.split(student / student_temp, num_crops)
    q = np.split(softmax((teacher - center) / teacher_temp), 2)
    total, terms = 0.0, 0
    for iq, v in itertools.product(range(2), range(num_crops)):
        if v == iq:
            continue
        log_p = (
            s[v]
            - np.log(np.exp(s[v] - s[v].max(-1, keepdims=True)).sum(-1, keepdims=True))
            - s[v].max(-1, keepdims=True)
        )
        total += np.mean(np.sum(-q[iq] * log_p, axis=-1))
        terms += 1
    return total / terms, terms


def test_matches_the_pairwise_loop_with_a_nonzero_center():
    rng = np.random.default_rng(0)
    batch, crops, k = 3, 6, 17
    student = rng.normal(size=(crops * batch, k)).astype(np.float32)
    teacher = rng.normal(size=(2 * batch, k)).astype(np.float32)
    center = rng.normal(size=(1, k)).astype(np.float32)
    loss, _ = losses.dino_loss(student, teacher, center, num_crops=crops, teacher_temperature=0.04)
    expected, terms = reference_loss(student, teacher, center, crops, 0.04)
    assert terms == 2 * (crops - 1)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


@pytest.mark.parametrize("lowered_for", [None, "cuda"])
@pytest.mark.parametrize("crops", [2, 3, 6])
def test_the_written_out_gradient_matches_autodiff_of_the_pairwise_loop(crops, lowered_for):
    # lowered_for="cuda": the GPU forms of the forward (test_head_loss_gpu_forms.py), same gradient.
    rng = np.random.default_rng(crops)
    batch, k = 3, 17
    student = jnp.asarray(rng.normal(size=(crops * batch, k)) * 3.0, jnp.float32)
    teacher = jnp.asarray(rng.normal(size=(2 * batch, k)), jnp.float32)
    center = jnp.asarray(rng.normal(size=(1, k)), jnp.float32)

    def pairwise_loop(student):
        log_p = jnp.split(jax.nn.log_softmax(student / 0.1, axis=-1), crops)
        q = jnp.split(jax.nn.softmax((teacher - center) / 0.04, axis=-1), 2)
        terms = [jnp.mean(jnp.sum(-q[t] * log_p[v], -1)) for t in range(2) for v in range(crops) if v != t]
        return sum(terms) / len(terms)

    def ours(student):
        with as_lowered_for(lowered_for) if lowered_for else contextlib.nullcontext():
            return losses.dino_loss(student, teacher, center, num_crops=crops, teacher_temperature=0.04)[0]

    expected_loss, expected_grad = jax.value_and_grad(pairwise_loop)(student)
    loss, grad = jax.value_and_grad(ours)(student)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-6)
    # Under a scaled loss (float16 training) the gradient scales with it.
    scaled = jax.grad(lambda s: 8.0 * ours(s))(student)
    np.testing.assert_allclose(scaled, 8.0 * expected_grad, rtol=1e-4, atol=1e-5)


def test_uniform_student_gives_log_k_whatever_the_teacher():
    k = 64
    teacher = np.random.default_rng(1).normal(size=(4, k)).astype(np.float32)
    loss, monitors = losses.dino_loss(
        np.zeros((10, k), np.float32), teacher, np.zeros((1, k)), num_crops=5, teacher_temperature=0.04
    )
    assert float(loss) == pytest.approx(np.log(k), rel=1e-6)
    assert float(monitors["teacher_entropy"]) < np.log(k)


def test_identical_sharp_distributions_give_near_zero_loss():
    # Every view says "prototype 3" with near certainty, for teacher and student alike.
    k, batch = 8, 2
    logits = np.full((batch, k), -1.0, np.float32)
    logits[:, 3] = 1.0
    student = np.tile(logits, (4, 1))
    teacher = np.tile(logits, (2, 1))
    loss, _ = losses.dino_loss(
        student, teacher, np.zeros((1, k)), num_crops=4, teacher_temperature=0.01, student_temperature=0.01
    )
    assert float(loss) < 1e-6


def test_same_view_pairs_are_skipped():
    # The student's first global view only meets the teacher's second view: changing the teacher's
    # first view must leave that view's gradient untouched.
    rng = np.random.default_rng(2)
    batch, crops, k = 2, 3, 5
    student = jnp.asarray(rng.normal(size=(crops * batch, k)), jnp.float32)
    teacher = rng.normal(size=(2 * batch, k)).astype(np.float32)
    other = teacher.copy()
    other[:batch] = rng.normal(size=(batch, k))

    def grad_view0(t):
        g = jax.grad(
            lambda s: losses.dino_loss(s, t, np.zeros((1, k)), num_crops=crops, teacher_temperature=0.04)[0]
        )(student)
        return np.asarray(g[:batch])

    np.testing.assert_allclose(grad_view0(teacher), grad_view0(other), atol=1e-7)
    assert not np.allclose(grad_view0(teacher), 0)


def test_center_update_is_an_ema_of_the_raw_teacher_batch_mean():
    teacher = np.arange(12, dtype=np.float32).reshape(4, 3)
    center = np.ones((1, 3), np.float32)
    updated = losses.update_center(center, teacher, momentum=0.9)
    np.testing.assert_allclose(
        np.asarray(updated), 0.9 * center + 0.1 * teacher.mean(0, keepdims=True), rtol=1e-6
    )


def test_teacher_monitors_tell_uniform_from_one_hot():
    k = 16
    uniform = losses.teacher_monitors(jnp.full((4, k), 1.0 / k))
    assert float(uniform["teacher_entropy"]) == pytest.approx(np.log(k), rel=1e-5)
    one_hot = losses.teacher_monitors(jax.nn.one_hot(jnp.zeros(4, int), k))
    assert float(one_hot["teacher_entropy"]) < 1e-3 and float(one_hot["teacher_batch_entropy"]) < 1e-3


def test_rows_that_do_not_split_into_crops_are_rejected():
    with pytest.raises(ValueError, match="do not split into 4 crops"):
        losses.dino_loss(
            np.zeros((10, 3)), np.zeros((4, 3)), np.zeros((1, 3)), num_crops=4, teacher_temperature=0.04
        )
    with pytest.raises(ValueError, match="at least 2"):
        losses.dino_loss(
            np.zeros((4, 3)), np.zeros((8, 3)), np.zeros((1, 3)), num_crops=1, teacher_temperature=0.04
        )
