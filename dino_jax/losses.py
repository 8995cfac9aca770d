"""The DINO loss with centering, and collapse monitors (docs/reference.md, "The loss and the center").

Pure functions of arrays. Row layout is crop-major, as in the reference: the student's logits are
`[g1 (B rows), g2, l1, ..., lL]` and the teacher's `[g1, g2]`.
"""

from __future__ import annotations

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
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Cross-entropy between centred/sharpened teacher views and every *other* student view.

    Pairs where the student and the teacher see the same global view are skipped; the sum of the
    remaining `2 * (num_crops - 1)` batch-mean terms is divided by their count. Returns the loss and
    monitors of the teacher's output distribution (entropies in nats).
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
    teacher_centred = (teacher_logits_2BxK.astype(jnp.float32) - center_1xK) / teacher_temperature
    teacher_probs_2xBxK = jax.lax.stop_gradient(reductions.softmax(teacher_centred).reshape(2, batch, -1))
    student_scaled_VxBxK = (student_logits_VBxK.astype(jnp.float32) / student_temperature).reshape(
        num_crops, batch, -1
    )
    loss = _cross_entropy_other_views(student_scaled_VxBxK, teacher_probs_2xBxK)
    monitors = teacher_monitors(teacher_probs_2xBxK.reshape(2 * batch, -1))
    return loss, monitors


@jax.custom_vjp
def _cross_entropy_other_views(student_scaled_VxBxK: jax.Array, teacher_probs_2xBxK: jax.Array) -> jax.Array:
    """Mean over the pairs (teacher view t, student view v != t) of mean_b -sum_k q_t log softmax(s_v).

    Written as `(q_0 + q_1) . sum_v log p_v` minus the two same-view terms, one elementwise pass and
    a sum. The backward is the closed form `ds_v = (n_v softmax(s_v) - sum_{t != v} q_t) / (B terms)`
    (n_v teacher views pair with v; each q_t sums to 1), one pass over the logits: autodiff of the
    forward made XLA:CPU contract the (2, V) pair matrix over batch x out_dim as a slow matrix
    product and reduce the log-softmax gradient in a second pass (docs/benchmarks.md).
    """
    return _cross_entropy_forward(student_scaled_VxBxK, teacher_probs_2xBxK)[0]


def _cross_entropy_forward(student_scaled_VxBxK, teacher_probs_2xBxK):
    num_views, batch = student_scaled_VxBxK.shape[:2]
    log_norm_VxBx1 = reductions.logsumexp(student_scaled_VxBxK)
    log_probs_VxBxK = student_scaled_VxBxK - log_norm_VxBx1
    q0_BxK, q1_BxK = teacher_probs_2xBxK[0], teacher_probs_2xBxK[1]
    log_prob_sum_BxK = log_probs_VxBxK[0]
    for view in range(1, num_views):
        log_prob_sum_BxK = log_prob_sum_BxK + log_probs_VxBxK[view]
    cross_BxK = (
        (q0_BxK + q1_BxK) * log_prob_sum_BxK - q0_BxK * log_probs_VxBxK[0] - q1_BxK * log_probs_VxBxK[1]
    )
    loss = -jnp.sum(cross_BxK) / (batch * _num_terms(num_views))
    return loss, (student_scaled_VxBxK, log_norm_VxBx1, teacher_probs_2xBxK)


def _cross_entropy_backward(residuals, dloss):
    student_scaled_VxBxK, log_norm_VxBx1, teacher_probs_2xBxK = residuals
    num_views, batch = student_scaled_VxBxK.shape[:2]
    q0_BxK, q1_BxK = teacher_probs_2xBxK[0], teacher_probs_2xBxK[1]
    # Global view v pairs with the other teacher view (q_0 + q_1 - q_v), a local view with both:
    # selects on the view index, so that the whole gradient is one elementwise pass.
    view_Vx1x1 = jax.lax.broadcasted_iota(jnp.int32, (num_views, 1, 1), 0)
    same_view_VxBxK = jnp.where(view_Vx1x1 == 0, q0_BxK, jnp.where(view_Vx1x1 == 1, q1_BxK, 0.0))
    pairs_Vx1x1 = jnp.where(view_Vx1x1 < 2, 1.0, 2.0)
    probs_VxBxK = jnp.exp(student_scaled_VxBxK - log_norm_VxBx1)
    scale = dloss / (batch * _num_terms(num_views))
    return (pairs_Vx1x1 * probs_VxBxK - (q0_BxK + q1_BxK - same_view_VxBxK)) * scale, None


_cross_entropy_other_views.defvjp(_cross_entropy_forward, _cross_entropy_backward)


def _num_terms(num_views: int) -> int:
    return 2 * (num_views - 1)


def teacher_monitors(teacher_probs_NxK: jax.Array) -> dict[str, jax.Array]:
    """Two entropies that tell the two kinds of collapse apart.

    - `teacher_entropy`: mean per-image entropy. At ln(K) every image gets the uniform
      distribution (uniform collapse; the loss then sits at ln(K) too).
    - `teacher_batch_entropy`: entropy of the batch-mean distribution. Near 0 every image picks the
      same prototype (one-hot collapse); healthy training keeps it high while the per-image entropy
      falls.
    """
    log_probs = jnp.log(jnp.clip(teacher_probs_NxK, 1e-30))
    per_image = -jnp.mean(reductions.row_sum(teacher_probs_NxK * log_probs))
    mean_probs = reductions.column_mean(teacher_probs_NxK)[0]
    batch = -jnp.sum(mean_probs * jnp.log(jnp.clip(mean_probs, 1e-30)))
    return {"teacher_entropy": per_image, "teacher_batch_entropy": batch}


def update_center(center_1xK: jax.Array, teacher_logits_2BxK: jax.Array, momentum: float = 0.9) -> jax.Array:
    """EMA of the raw teacher logits' mean over the whole (global) batch.

    Under jit with a batch sharded across devices, `mean(axis=0)` is already the cross-device mean
    that the reference computes with all_reduce / (2B * world_size).
    """
    batch_center = reductions.column_mean(teacher_logits_2BxK.astype(jnp.float32))
    return center_1xK * momentum + batch_center * (1 - momentum)
