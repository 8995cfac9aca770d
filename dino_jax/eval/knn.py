"""Weighted k-nearest-neighbour classification of frozen features (the reference's kNN protocol).

The protocol (the reference's `eval_knn.py`; docs/reference.md): L2-normalise train and test
features, rank the train set by cosine similarity, take the k most similar, weight each neighbour's
vote by `exp(similarity / T)`, sum the votes per class and predict the classes in descending score
order.
Top-1 and top-`min(5, k)` accuracies are reported in percent.

Differences from the reference, all deliberate:
- The test set is split into chunks of a fixed shape (the last one padded and masked), so any
  number of test images works (the reference needs at least 100) and one compilation serves every
  chunk.
- The one-hot width is `num_classes`, not a hard-coded 1000.
- One `top_k` over the largest k; smaller k reuse the prefix of the same sorted neighbours.
- Ties between class scores rank the lower class index first (the reference leaves them to
  `torch.sort`, whose tie order is unspecified). With exp-weighted float votes such ties occur in
  practice only between classes that received no vote at all.
- A k larger than the number of training features raises `ValueError` (the reference's `topk`
  fails too, less clearly); there is no silent clamping, so a reported `knn_k200_top1` always
  used 200 neighbours.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dino_jax.eval import inputs

# Largest similarity block (chunk x num_train float32 values) built at once: 64 Mi values, 256 MiB.
_MAX_SIMILARITY_VALUES = 1 << 26
_MAX_CHUNK_SIZE = 1024


def _l2_normalize(x_NxD):
    # Same epsilon as torch.nn.functional.normalize, which the reference uses.
    norm_Nx1 = jnp.linalg.norm(x_NxD, axis=-1, keepdims=True)
    return x_NxD / jnp.maximum(norm_Nx1, 1e-12)


@functools.partial(jax.jit, static_argnames=("ks", "num_classes", "temperature"))
def _chunk_correct_counts(
    train_x_NxD,
    train_y_N,
    test_x_BxD,
    test_y_B,
    mask_B,
    *,
    ks: tuple[int, ...],
    num_classes: int,
    temperature: float,
):
    """Returns `(len(ks), 2)` int32: per k, correct top-1 and top-min(5,k) among unmasked rows."""
    similarity_BxN = _l2_normalize(test_x_BxD) @ train_x_NxD.T
    top_sim_BxK, top_idx_BxK = jax.lax.top_k(similarity_BxN, max(ks))
    neighbour_labels_BxK = train_y_N[top_idx_BxK]
    weights_BxK = jnp.exp(top_sim_BxK / temperature)

    batch = test_x_BxD.shape[0]
    rows_Bx1 = jnp.arange(batch)[:, None]
    scores_BxC = jnp.zeros((batch, num_classes), jnp.float32)
    counts = []
    previous_k = 0
    for k in ks:  # ks is sorted: each k adds only its new neighbours' votes to the smaller k's.
        scores_BxC = scores_BxC.at[rows_Bx1, neighbour_labels_BxK[:, previous_k:k]].add(
            weights_BxK[:, previous_k:k]
        )
        previous_k = k
        # Rank of the true class under "descending score, lower class index first on ties"; counting
        # beats sorting all classes.
        true_score_Bx1 = jnp.take_along_axis(scores_BxC, test_y_B[:, None], axis=1)
        class_ids_1xC = jnp.arange(num_classes)[None, :]
        ahead_BxC = (scores_BxC > true_score_Bx1) | (
            (scores_BxC == true_score_Bx1) & (class_ids_1xC < test_y_B[:, None])
        )
        rank_B = jnp.sum(ahead_BxC, axis=1)
        top1 = jnp.sum((rank_B < 1) & mask_B)
        top5 = jnp.sum((rank_B < min(5, k)) & mask_B)
        counts.append(jnp.stack([top1, top5]))
    return jnp.stack(counts).astype(jnp.int32)


def weighted_knn(
    train_features,
    train_labels,
    test_features,
    test_labels,
    *,
    num_classes: int,
    ks: Sequence[int],
    temperature: float,
    chunk_size: int | None = None,
) -> dict[str, float]:
    """Weighted kNN accuracy of `test_features` against `train_features`, in percent.

    Args:
      train_features: `(N, D)` float features (need not be normalised).
      train_labels: `(N,)` integer labels in `[0, num_classes)`.
      test_features: `(M, D)` float features, any `M >= 1`.
      test_labels: `(M,)` integer labels in `[0, num_classes)`.
      num_classes: number of classes (width of the vote vector).
      ks: neighbour counts, each in `[1, N]` (the reference: 10, 20, 100, 200).
      temperature: vote weight is `exp(cosine_similarity / temperature)` (the reference: 0.07).
      chunk_size: test rows per device call; default keeps a chunk's `(chunk, N)` similarity block
        under 256 MiB. Larger is faster up to the memory limit.

    Returns:
      `{"knn_k{k}_top1": %, "knn_k{k}_top5": %}` for each k; top-5 counts a hit among the first
      `min(5, k)` predicted classes.

    Raises:
      ValueError: on mismatched shapes, labels outside `[0, num_classes)`, an empty set, or a k
        outside `[1, N]`.
    """
    train_x, train_y, test_x, test_y = inputs.feature_splits(
        "weighted_knn", train_features, train_labels, test_features, test_labels, num_classes
    )
    num_train, num_test = train_x.shape[0], test_x.shape[0]
    sorted_ks = tuple(sorted({int(k) for k in ks}))
    if not sorted_ks or sorted_ks[0] < 1 or sorted_ks[-1] > num_train:
        raise ValueError(
            f"weighted_knn: ks={tuple(ks)}; expected a non-empty set of neighbour counts "
            f"in [1, {num_train}] (the number of training features)"
        )
    if temperature <= 0:
        raise ValueError(f"weighted_knn: temperature={temperature}; expected > 0")

    if chunk_size is None:
        chunk_size = max(1, min(_MAX_CHUNK_SIZE, _MAX_SIMILARITY_VALUES // num_train))
    if chunk_size < 1:
        raise ValueError(f"weighted_knn: chunk_size={chunk_size}; expected >= 1")
    # A small test set needs no padding up to a large chunk.
    chunk_size = min(chunk_size, num_test)
    num_chunks = -(-num_test // chunk_size)
    padded = num_chunks * chunk_size
    test_x = np.pad(test_x, ((0, padded - num_test), (0, 0)))
    test_y = np.pad(test_y, (0, padded - num_test))
    mask = np.arange(padded) < num_test

    train_x_NxD = jax.jit(_l2_normalize)(jnp.asarray(train_x))
    train_y_N = jnp.asarray(train_y)
    counts = jnp.zeros((len(sorted_ks), 2), jnp.int32)
    # Chunks are dispatched asynchronously; the only host sync is the final fetch.
    for start in range(0, padded, chunk_size):
        stop = start + chunk_size
        counts = counts + _chunk_correct_counts(
            train_x_NxD,
            train_y_N,
            test_x[start:stop],
            test_y[start:stop],
            mask[start:stop],
            ks=sorted_ks,
            num_classes=int(num_classes),
            temperature=float(temperature),
        )
    counts = np.asarray(counts)

    results = {}
    for i, k in enumerate(sorted_ks):
        results[f"knn_k{k}_top1"] = 100.0 * float(counts[i, 0]) / num_test
        results[f"knn_k{k}_top5"] = 100.0 * float(counts[i, 1]) / num_test
    return results
