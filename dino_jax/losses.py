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
    batch = num_rows // num_crops
    if teacher_logits_2BxK.shape[0] != 2 * batch:
        raise ValueError(
            f"teacher has {teacher_logits_2BxK.shape[0]} rows, expected 2 global crops x {batch} images"
        )
    student_log_probs_VxBxK = jax.nn.log_softmax(
        (student_logits_VBxK.astype(jnp.float32) / student_temperature).reshape(num_crops, batch, -1), axis=-1
    )
    teacher_centred = (teacher_logits_2BxK.astype(jnp.float32) - center_1xK) / teacher_temperature
    teacher_probs_2xBxK = jax.lax.stop_gradient(
        jax.nn.softmax(teacher_centred, axis=-1).reshape(2, batch, -1)
    )

    # cross_entropy_2xV[t, v] = mean over the batch of -sum_k q_t log p_v; then drop t == v.
    cross_entropy_2xV = -jnp.einsum("tbk,vbk->tv", teacher_probs_2xBxK, student_log_probs_VxBxK) / batch
    same_view = jnp.eye(2, num_crops, dtype=bool)
    num_terms = 2 * (num_crops - 1)
    loss = jnp.sum(jnp.where(same_view, 0.0, cross_entropy_2xV)) / num_terms

    monitors = teacher_monitors(teacher_probs_2xBxK.reshape(2 * batch, -1))
    return loss, monitors


def teacher_monitors(teacher_probs_NxK: jax.Array) -> dict[str, jax.Array]:
    """Two entropies that tell the two kinds of collapse apart.

    - `teacher_entropy`: mean per-image entropy. At ln(K) every image gets the uniform
      distribution (uniform collapse; the loss then sits at ln(K) too).
    - `teacher_batch_entropy`: entropy of the batch-mean distribution. Near 0 every image picks the
      same prototype (one-hot collapse); healthy training keeps it high while the per-image entropy
      falls.
    """
    log_probs = jnp.log(jnp.clip(teacher_probs_NxK, 1e-30))
    per_image = -jnp.sum(teacher_probs_NxK * log_probs, axis=-1).mean()
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
