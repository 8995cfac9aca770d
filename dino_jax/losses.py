"""The DINO loss with centering, and collapse monitors (docs/reference.md, "The loss and the center").

Pure functions of arrays. Row layout is crop-major, as in the reference: the student's logits are
`[g1 (B rows), g2, l1, ..., lL]` and the teacher's `[g1, g2]`.

Each pass over the 65,536-wide logits is paid in full on a GPU (2560 x 65536 student logits at
CIFAR scale, 335 MB a read in float16), so there the softmax statistics of each row (max, sum of
exponentials, entropy, the teacher-weighted sum) come from one read (`reductions.
softmax_statistics_one_pass`); the CPU keeps the forms its timings chose (`reductions.py`). The
choice is made when lowering, per backend (`lax.platform_dependent`); float32 results agree to
float32 rounding (tests/test_head_loss_gpu_forms.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dino_jax import reductions


def dino_loss(
    student_logits_VBxK: jax.Array,
    teacher_logits_2BxK: jax.Array,
    center_1xK: jax.Array,
    *,
    num_crops: int,
    teacher_temperature: jax.Array | float,
    student_temperature: float = 0.1,
    shards: int = 1,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Cross-entropy between centred/sharpened teacher views and every *other* student view.

    Pairs where the student and the teacher see the same global view are skipped; the sum of the
    remaining `2 * (num_crops - 1)` batch-mean terms is divided by their count. Returns the loss and
    monitors of the teacher's output distribution (entropies in nats).

    Rows are view-major (`[view 0 of every image, view 1, ...]`), or with `shards` > 1 (the batch
    split over that many devices) view-major device by device, as `train_step.crop_major` orders
    the crops so that no image leaves its device.
    """
    num_rows = student_logits_VBxK.shape[0]
    if num_rows % num_crops:
        raise ValueError(f"{num_rows} student rows do not split into {num_crops} crops")
    if num_crops < 2:
        raise ValueError(f"num_crops {num_crops} must be at least 2 (the two global views)")
    batch = num_rows // num_crops
    if teacher_logits_2BxK.shape[0] != 2 * batch:
        raise ValueError(
            f"teacher has {teacher_logits_2BxK.shape[0]} rows, expected 2 global crops x {batch} images"
        )
    # The teacher is a constant of the loss: stopped before its softmax, no form of which is
    # then differentiated (the GPU form's variadic reduce has no derivative).
    teacher_centred_2BxK = jax.lax.stop_gradient(
        (teacher_logits_2BxK.astype(jnp.float32) - center_1xK) / teacher_temperature
    )
    teacher_probs_2BxK, teacher_entropy_2Bx1 = jax.lax.platform_dependent(
        teacher_centred_2BxK, cuda=_teacher_softmax_one_pass, default=_teacher_softmax
    )
    student_scaled_VxBxK = _views_major(
        student_logits_VBxK.astype(jnp.float32) / student_temperature, num_crops, shards
    )
    loss = _cross_entropy_other_views(student_scaled_VxBxK, _views_major(teacher_probs_2BxK, 2, shards))
    monitors = {
        "teacher_entropy": jnp.mean(teacher_entropy_2Bx1),
        "teacher_batch_entropy": _batch_entropy(teacher_probs_2BxK),
    }
    return loss, monitors


def _views_major(rows_NxK: jax.Array, num_views: int, shards: int) -> jax.Array:
    """(V*B, K) rows, view-major device by device -> (V, B, K), images in batch order. The device
    axis stays the outer part of the batch axis, so the rows stay on their devices."""
    per_device = rows_NxK.reshape(shards, num_views, -1, rows_NxK.shape[-1])
    return jnp.swapaxes(per_device, 0, 1).reshape(num_views, -1, rows_NxK.shape[-1])


def _teacher_softmax(teacher_centred_NxK):
    """`(softmax, entropy of each row (N, 1))`, the row sums as `reductions.row_sum`."""
    probs_NxK = reductions.softmax(teacher_centred_NxK)
    return probs_NxK, _row_entropy(probs_NxK)


def _teacher_softmax_one_pass(teacher_centred_NxK):
    """`_teacher_softmax` for GPUs: the normaliser and the entropy from one read of the logits,
    then one pass writes the softmax; the max, the sum and the entropy were a read each."""
    log_norm_Nx1, entropy_Nx1, _ = reductions.softmax_statistics_one_pass(teacher_centred_NxK, entropy=True)
    return jnp.exp(teacher_centred_NxK - log_norm_Nx1), entropy_Nx1


def _row_entropy(probs_NxK):
    return -reductions.row_sum(probs_NxK * jnp.log(jnp.clip(probs_NxK, 1e-30)))


def _batch_entropy(probs_NxK):
    mean_probs = reductions.column_mean(probs_NxK)[0]
    return -jnp.sum(mean_probs * jnp.log(jnp.clip(mean_probs, 1e-30)))


@jax.custom_vjp
def _cross_entropy_other_views(student_scaled_VxBxK: jax.Array, teacher_probs_2xBxK: jax.Array) -> jax.Array:
    """Mean over the pairs (teacher view t, student view v != t) of mean_b -sum_k q_t log softmax(s_v).

    Written as `(q_0 + q_1) . sum_v log p_v` minus the two same-view terms, one elementwise pass and
    a sum (on a GPU, `_cross_entropy_one_pass`: one variadic reduce). The backward is the closed form `ds_v = (n_v softmax(s_v) - sum_{t != v} q_t) / (B terms)`
    (n_v teacher views pair with v; each q_t sums to 1), one pass over the logits: autodiff of the
    forward made XLA:CPU contract the (2, V) pair matrix over batch x out_dim as a slow matrix
    product and reduce the log-softmax gradient in a second pass (docs/benchmarks.md).
    """
    return _cross_entropy_forward(student_scaled_VxBxK, teacher_probs_2xBxK)[0]


def _cross_entropy_forward(student_scaled_VxBxK, teacher_probs_2xBxK):
    num_views, batch = student_scaled_VxBxK.shape[:2]
    loss, log_norm_VxBx1 = jax.lax.platform_dependent(
        student_scaled_VxBxK,
        teacher_probs_2xBxK,
        cuda=_cross_entropy_one_pass,
        default=_cross_entropy_log_probs,
    )
    return loss / (batch * _num_terms(num_views)), (student_scaled_VxBxK, log_norm_VxBx1, teacher_probs_2xBxK)


def _cross_entropy_log_probs(student_scaled_VxBxK, teacher_probs_2xBxK):
    """The summed cross-entropy over log-probabilities (one elementwise pass after the logsumexp)."""
    num_views = student_scaled_VxBxK.shape[0]
    log_norm_VxBx1 = reductions.logsumexp(student_scaled_VxBxK)
    log_probs_VxBxK = student_scaled_VxBxK - log_norm_VxBx1
    q0_BxK, q1_BxK = teacher_probs_2xBxK[0], teacher_probs_2xBxK[1]
    log_prob_sum_BxK = log_probs_VxBxK[0]
    for view in range(1, num_views):
        log_prob_sum_BxK = log_prob_sum_BxK + log_probs_VxBxK[view]
    cross_BxK = (
        (q0_BxK + q1_BxK) * log_prob_sum_BxK - q0_BxK * log_probs_VxBxK[0] - q1_BxK * log_probs_VxBxK[1]
    )
    return -jnp.sum(cross_BxK), log_norm_VxBx1


def _cross_entropy_one_pass(student_scaled_VxBxK, teacher_probs_2xBxK):
    """`_cross_entropy_log_probs` for GPUs, from one read of the student's logits: each row's
    logsumexp and its sum weighted by the paired teacher views `Q_v` come out of one variadic
    reduce, and `-sum_k Q_v (s_v - lse_v) = n_v lse_v - sum_k Q_v s_v` (each q_t sums to 1). The
    max, the sum of exponentials and the weighted sum were a read each."""
    num_views = student_scaled_VxBxK.shape[0]
    paired_VxBxK = _paired_teacher(teacher_probs_2xBxK, num_views)
    log_norm_VxBx1, _, (cross_VxBx1,) = reductions.softmax_statistics_one_pass(
        student_scaled_VxBxK, plain=[paired_VxBxK * student_scaled_VxBxK]
    )
    return jnp.sum(_pairs(num_views) * log_norm_VxBx1 - cross_VxBx1), log_norm_VxBx1


def _paired_teacher(teacher_probs_2xBxK, num_views):
    """(V, B, K): the teacher views student view v pairs with, summed: `q_1` for v = 0, `q_0` for
    v = 1, `q_0 + q_1` for a local view; selected on the view index, so that it stays elementwise
    (no (V, B, K) copy). As `q_0 + q_1 - q_v` (the CPU's form, as timed there) XLA's GPU fusion
    writes `q_0 + q_1` out whole; as masks of q_0 and q_1 it does not."""
    return jax.lax.platform_dependent(
        teacher_probs_2xBxK,
        cpu=functools.partial(_paired_by_subtraction, num_views=num_views),
        default=functools.partial(_paired_by_masks, num_views=num_views),
    )


def _paired_by_subtraction(teacher_probs_2xBxK, num_views):
    q0_BxK, q1_BxK = teacher_probs_2xBxK[0], teacher_probs_2xBxK[1]
    view_Vx1x1 = jax.lax.broadcasted_iota(jnp.int32, (num_views, 1, 1), 0)
    same_view_VxBxK = jnp.where(view_Vx1x1 == 0, q0_BxK, jnp.where(view_Vx1x1 == 1, q1_BxK, 0.0))
    return q0_BxK + q1_BxK - same_view_VxBxK


def _paired_by_masks(teacher_probs_2xBxK, num_views):
    view_Vx1x1 = jax.lax.broadcasted_iota(jnp.int32, (num_views, 1, 1), 0)
    return jnp.where(view_Vx1x1 == 0, 0.0, teacher_probs_2xBxK[0]) + jnp.where(
        view_Vx1x1 == 1, 0.0, teacher_probs_2xBxK[1]
    )


def _pairs(num_views):
    """(V, 1, 1): how many teacher views each student view pairs with (1 for a global, 2 for a local)."""
    view_Vx1x1 = jax.lax.broadcasted_iota(jnp.int32, (num_views, 1, 1), 0)
    return jnp.where(view_Vx1x1 < 2, 1.0, 2.0)


def _cross_entropy_backward(residuals, dloss):
    student_scaled_VxBxK, log_norm_VxBx1, teacher_probs_2xBxK = residuals
    num_views, batch = student_scaled_VxBxK.shape[:2]
    # One elementwise pass over the logits.
    paired_VxBxK = _paired_teacher(teacher_probs_2xBxK, num_views)
    probs_VxBxK = jnp.exp(student_scaled_VxBxK - log_norm_VxBx1)
    scale = dloss / (batch * _num_terms(num_views))
    return (_pairs(num_views) * probs_VxBxK - paired_VxBxK) * scale, None


_cross_entropy_other_views.defvjp(_cross_entropy_forward, _cross_entropy_backward)


def _num_terms(num_views: int) -> int:
    return 2 * (num_views - 1)


def teacher_monitors(teacher_probs_NxK: jax.Array) -> dict[str, jax.Array]:
    """Two entropies that tell the two kinds of collapse apart (`dino_loss` returns them).

    - `teacher_entropy`: mean per-image entropy. At ln(K) every image gets the uniform
      distribution (uniform collapse; the loss then sits at ln(K) too).
    - `teacher_batch_entropy`: entropy of the batch-mean distribution. Near 0 every image picks the
      same prototype (one-hot collapse); healthy training keeps it high while the per-image entropy
      falls.
    """
    return {
        "teacher_entropy": jnp.mean(_row_entropy(teacher_probs_NxK)),
        "teacher_batch_entropy": _batch_entropy(teacher_probs_NxK),
    }


def update_center(center_1xK: jax.Array, teacher_logits_2BxK: jax.Array, momentum: float = 0.9) -> jax.Array:
    """EMA of the raw teacher logits' mean over the whole (global) batch.

    Under jit with a batch sharded across devices, `mean(axis=0)` is already the cross-device mean
    that the reference computes with all_reduce / (2B * world_size).
    """
    batch_center = reductions.column_mean(teacher_logits_2BxK.astype(jnp.float32))
    return center_1xK * momentum + batch_center * (1 - momentum)
