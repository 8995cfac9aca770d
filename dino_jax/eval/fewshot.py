"""Few-shot episodes on frozen features (our protocol: the reference has none; docs/reference.md).

An N-way K-shot episode draws N classes (all classes of the data set by default), then for each
class K support and Q query examples, distinct, without replacement. Features are L2-normalised.
Two classifiers:
- `ncm`: nearest class mean: each query goes to the class whose mean support feature is closest
  in Euclidean distance (the means are not re-normalised).
- `logreg`: multinomial logistic regression on the support set, L2 penalty on the weights (not on
  the bias) with the strength of scikit-learn's default `LogisticRegression(C=1.0)`, solved by a
  fixed number of Nesterov-accelerated gradient steps whose step size comes from the smoothness
  bound of the loss on unit-norm features: no line search, so it vmaps over episodes.

The accuracy of each episode is the fraction of its N*Q queries classified right; the result is
the mean over episodes and the 95% confidence interval half-width `1.96 * std / sqrt(episodes)`,
both in percent. Episodes are drawn on the host from `numpy.random.default_rng(seed)`, so a seed
always gives the same episodes, on any device.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

CLASSIFIERS = ("ncm", "logreg")


class EpisodeError(ValueError):
    """The data cannot fill the episodes asked for (too few classes, or too few images of a class)."""


def sample_episodes(
    labels, *, n_way: int | None, k_shot: int, n_query: int, episodes: int, seed: int
) -> np.ndarray:
    """Row indices of `episodes` episodes: int32 `(episodes, n_way, k_shot + n_query)`.

    In each `[e, w]` row the first `k_shot` are support, the rest queries, all of class
    `episode_classes[e, w]`; the way index `w` is the episode-local label. `n_way=None` uses every
    class present in `labels`.
    """
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    n_way = len(classes) if n_way is None else int(n_way)
    per_class = k_shot + n_query
    if k_shot < 1 or n_query < 1 or episodes < 1:
        raise ValueError(
            f"few-shot: k_shot={k_shot}, n_query={n_query}, episodes={episodes}; expected all >= 1"
        )
    if not 2 <= n_way <= len(classes):
        raise EpisodeError(
            f"few-shot: n_way={n_way} but the labels hold {len(classes)} classes; "
            f"expected 2 <= n_way <= {len(classes)}"
        )
    if counts.min() < per_class:
        short = classes[counts < per_class]
        raise EpisodeError(
            f"few-shot: classes {short.tolist()} have fewer than {per_class} examples "
            f"(smallest: {counts.min()}); a {k_shot}-shot episode with {n_query} "
            "queries per class needs that many of each class"
        )
    rng = np.random.default_rng(seed)
    members = {c: np.flatnonzero(labels == c) for c in classes}
    if n_way == len(classes):
        episode_classes = np.broadcast_to(classes, (episodes, n_way))
    else:
        episode_classes = np.stack([rng.choice(classes, n_way, replace=False) for _ in range(episodes)])
    indices = np.empty((episodes, n_way, per_class), np.int32)
    for c in classes:
        episode_ids, way_ids = np.nonzero(episode_classes == c)
        if len(episode_ids) == 0:
            continue
        # Ranking random keys picks `per_class` distinct members per episode in one vectorised call.
        keys = rng.random((len(episode_ids), len(members[c])))
        picks = np.argpartition(keys, per_class - 1, axis=1)[:, :per_class]
        indices[episode_ids, way_ids] = members[c][picks]
    return indices


def _l2_normalize(x):
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _ncm_accuracy(support_WxKxD, query_WxQxD):
    n_way, n_query = query_WxQxD.shape[:2]
    means_WxD = jnp.mean(support_WxKxD, axis=1)
    query_MxD = query_WxQxD.reshape(n_way * n_query, -1)
    # ||q - m||^2 up to the per-query constant ||q||^2.
    distance_MxW = jnp.sum(means_WxD**2, axis=1)[None, :] - 2.0 * query_MxD @ means_WxD.T
    truth_M = jnp.repeat(jnp.arange(n_way), n_query)
    return jnp.mean(jnp.argmin(distance_MxW, axis=1) == truth_M)


def _logreg_accuracy(support_WxKxD, query_WxQxD, *, steps: int):
    n_way, k_shot, dim = support_WxKxD.shape
    n_query = query_WxQxD.shape[1]
    x_SxD = support_WxKxD.reshape(n_way * k_shot, dim)
    y_S = jnp.repeat(jnp.arange(n_way), k_shot)
    num_support = n_way * k_shot
    # scikit-learn's C=1 objective is sum(CE) + |W|^2 / 2; divided by the sample count:
    l2 = 1.0 / num_support
    # Softmax cross-entropy has Hessian <= |x|^2 / 2 per sample; with the bias |(x, 1)|^2 = 2.
    smoothness = 1.0 + l2
    momentum = (jnp.sqrt(smoothness) - jnp.sqrt(l2)) / (jnp.sqrt(smoothness) + jnp.sqrt(l2))

    def objective(params):
        logits_SxW = x_SxD @ params["kernel"] + params["bias"]
        log_probs = jax.nn.log_softmax(logits_SxW)
        ce = -jnp.mean(jnp.take_along_axis(log_probs, y_S[:, None], axis=1))
        return ce + 0.5 * l2 * jnp.sum(params["kernel"] ** 2)

    def step(carry, _):
        params, previous = carry
        lookahead = jax.tree.map(lambda p, q: p + momentum * (p - q), params, previous)
        grads = jax.grad(objective)(lookahead)
        new = jax.tree.map(lambda p, g: p - g / smoothness, lookahead, grads)
        return (new, params), None

    zeros = {"kernel": jnp.zeros((dim, n_way)), "bias": jnp.zeros((n_way,))}
    (params, _), _ = jax.lax.scan(step, (zeros, zeros), None, length=steps)
    query_MxD = query_WxQxD.reshape(n_way * n_query, dim)
    predicted_M = jnp.argmax(query_MxD @ params["kernel"] + params["bias"], axis=1)
    return jnp.mean(predicted_M == jnp.repeat(jnp.arange(n_way), n_query))


@functools.partial(jax.jit, static_argnames=("k_shot", "classifiers", "logreg_steps", "episodes_per_call"))
def _episode_accuracies(
    features_NxD,
    indices_ExWxP,
    *,
    k_shot: int,
    classifiers: tuple[str, ...],
    logreg_steps: int,
    episodes_per_call: int,
):
    features_NxD = _l2_normalize(features_NxD)

    def one_episode(indices_WxP):
        episode_WxPxD = features_NxD[indices_WxP]
        support, query = episode_WxPxD[:, :k_shot], episode_WxPxD[:, k_shot:]
        accuracies = []
        for name in classifiers:
            if name == "ncm":
                accuracies.append(_ncm_accuracy(support, query))
            else:
                accuracies.append(_logreg_accuracy(support, query, steps=logreg_steps))
        return jnp.stack(accuracies)

    # Bounded memory: only `episodes_per_call` episodes' features are gathered at a time.
    return jax.lax.map(one_episode, indices_ExWxP, batch_size=episodes_per_call)


def few_shot(
    features,
    labels,
    *,
    n_way: int | None,
    k_shot: int,
    n_query: int,
    episodes: int,
    classifiers: Sequence[str],
    logreg_steps: int = 300,
    seed: int = 0,
    episodes_per_call: int = 16,
) -> dict[str, float]:
    """Few-shot accuracy of frozen features, in percent.

    Args:
      features: `(N, D)` float features of the evaluation split.
      labels: `(N,)` integer labels; every class used needs `k_shot + n_query` examples.
      n_way: classes per episode; None uses all classes.
      k_shot, n_query: support and query examples per class and episode.
      episodes: number of episodes; the interval shrinks as `1/sqrt(episodes)`.
      classifiers: any of `CLASSIFIERS`. `logreg` costs `logreg_steps` gradient steps per episode
        (about 2 * 2 * n_way * k_shot * D * n_way FLOPs each): cheap for 10-way, minutes on a CPU for
        100-way with 600 episodes.
      seed: episode sampling seed.

    Returns:
      `{f"fewshot_{k_shot}shot_{name}": mean, f"fewshot_{k_shot}shot_{name}_ci95": half-width}`
      for each classifier.
    """
    classifiers = tuple(classifiers)
    unknown = [name for name in classifiers if name not in CLASSIFIERS]
    if unknown or not classifiers:
        raise ValueError(f"few-shot: classifiers {classifiers}; expected a non-empty subset of {CLASSIFIERS}")
    features = np.asarray(features, np.float32)
    labels = np.asarray(labels)
    if features.ndim != 2 or labels.shape != (features.shape[0],):
        raise ValueError(
            f"few-shot: features {features.shape} and labels {labels.shape}; expected (N, D) and (N,)"
        )
    indices = sample_episodes(
        labels, n_way=n_way, k_shot=k_shot, n_query=n_query, episodes=episodes, seed=seed
    )
    accuracies_ExC = 100.0 * np.asarray(
        _episode_accuracies(
            jnp.asarray(features),
            jnp.asarray(indices),
            k_shot=int(k_shot),
            classifiers=classifiers,
            logreg_steps=int(logreg_steps),
            episodes_per_call=int(min(episodes_per_call, episodes)),
        ),
        np.float64,
    )
    results = {}
    for column, name in enumerate(classifiers):
        mean, ci95 = mean_and_ci95(accuracies_ExC[:, column])
        results[f"fewshot_{k_shot}shot_{name}"] = mean
        results[f"fewshot_{k_shot}shot_{name}_ci95"] = ci95
    return results


def mean_and_ci95(values) -> tuple[float, float]:
    """Mean and the normal-approximation 95% interval half-width, `1.96 * std / sqrt(n)`."""
    values = np.asarray(values, np.float64)
    return float(values.mean()), float(1.96 * values.std() / np.sqrt(len(values)))
