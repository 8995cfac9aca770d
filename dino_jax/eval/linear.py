"""Linear probe on frozen features: the reference's `eval_linear.py` protocol.

Protocol (docs/reference.md): one `Linear(D, C)` layer, weight N(0, 0.01), bias 0, no BatchNorm, on
the raw (not normalised) features; cross-entropy; SGD with momentum 0.9, no weight decay,
learning rate `0.001 * batch_size / 256`; cosine annealing to 0 stepped once per epoch
(`CosineAnnealingLR(T_max=epochs)`); every epoch the minibatches are reshuffled, the last one may be
smaller (the reference's loader keeps it); the test set is evaluated after every epoch and the
reported figure is the best test top-1 over epochs.

One driver runs every probe: each epoch (the shuffled minibatch steps, then the test pass) is one
jitted call, a scan over the minibatches, vmapped over the learning rates of a sweep. The last
minibatch of an epoch is padded to the batch size and its padding masked out of the loss, so every
step has one shape.

`linear_probe` trains on one view of each image (cached features) every epoch.
`linear_probe_augmented` is the reference's training on augmented images (RandomResizedCrop +
flip): the backbone is frozen, so that is the same optimisation run on new features of new views of
every train image each epoch; the caller makes them (`dino_jax.eval.suite` does, from
`dino_jax.data.pipeline`'s views).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dino_jax.eval import inputs

MOMENTUM = 0.9
INIT_STD = 0.01


@dataclasses.dataclass(frozen=True)
class LinearProbeResult:
    """Outcome of one probe. Accuracies in percent; losses are mean cross-entropy in nats.

    `train_top1`/`train_loss` are running means over the minibatches of the last epoch (the
    reference logs its train loss this way); the `test_*` values are for the final classifier;
    `best_test_top1` is the maximum over epochs (the reference's reported number), reached after
    epoch `best_epoch` (1-based). The `*_per_epoch` arrays hold one value per epoch.
    """

    test_top1: float
    test_top5: float
    test_loss: float
    best_test_top1: float
    best_epoch: int
    train_top1: float
    train_loss: float
    learning_rate: float
    test_top1_per_epoch: np.ndarray
    train_loss_per_epoch: np.ndarray

    def metrics(self, prefix: str = "linear") -> dict[str, float]:
        """Flat `{f"{prefix}_<name>": value}` of the scalar results."""
        names = (
            "test_top1",
            "test_top5",
            "test_loss",
            "best_test_top1",
            "best_epoch",
            "train_top1",
            "train_loss",
        )
        return {f"{prefix}_{name}": float(getattr(self, name)) for name in names}


def scaled_learning_rate(batch_size: int, base_lr: float) -> float:
    """The reference's linear scaling: `base_lr * batch_size / 256`."""
    return base_lr * batch_size / 256.0


def epoch_cosine_schedule(peak_lr: float, epochs: int, steps_per_epoch: int) -> optax.Schedule:
    """Learning rate at optimizer step `t`: `peak * (1 + cos(pi * epoch / epochs)) / 2` with
    `epoch = t // steps_per_epoch`: constant within an epoch, as `CosineAnnealingLR` stepped per
    epoch with `eta_min=0`. Epoch 0 uses the peak."""

    def schedule(step):
        epoch = jnp.asarray(step) // steps_per_epoch
        return peak_lr * 0.5 * (1.0 + jnp.cos(jnp.pi * epoch / epochs))

    return schedule


def _logits(params, x_NxD):
    # HIGHEST: accelerators would otherwise multiply in bfloat16, which the reference does not.
    return jnp.dot(x_NxD, params["kernel"], precision=jax.lax.Precision.HIGHEST) + params["bias"]


def _initial_params(key, dim: int, num_classes: int):
    return {
        "kernel": INIT_STD * jax.random.normal(key, (dim, num_classes), jnp.float32),
        "bias": jnp.zeros((num_classes,), jnp.float32),
    }


def _optimizer(learning_rate, epochs: int, steps_per_epoch: int) -> optax.GradientTransformation:
    # The schedule reads the step count kept in the optimizer state, so each epoch's call continues
    # the schedule where the previous epoch left it.
    return optax.sgd(epoch_cosine_schedule(learning_rate, epochs, steps_per_epoch), momentum=MOMENTUM)


def _steps_per_epoch(num_train: int, batch_size: int) -> int:
    return -(-num_train // batch_size)


def minibatch_order(shuffle_key, epoch_index, num_train: int) -> jax.Array:
    """The order of the train rows in epoch `epoch_index`: consecutive runs of the minibatch size
    are the minibatches, the last one shorter when the batch size does not divide `num_train`."""
    return jax.random.permutation(jax.random.fold_in(shuffle_key, epoch_index), num_train)


@functools.partial(jax.jit, static_argnames=("dim", "num_classes", "epochs", "steps_per_epoch"))
def _initial_state(key, learning_rates_L, *, dim: int, num_classes: int, epochs: int, steps_per_epoch: int):
    """`(params, opt_state)` of every rate (leading axis L), all from the same initial weights, and
    the key that shuffles the minibatches of every epoch."""
    init_key, shuffle_key = jax.random.split(key)
    initial_params = _initial_params(init_key, dim, num_classes)

    def one_rate(learning_rate):
        return initial_params, _optimizer(learning_rate, epochs, steps_per_epoch).init(initial_params)

    return jax.vmap(one_rate)(learning_rates_L), shuffle_key


@functools.partial(jax.jit, static_argnames=("num_classes", "epochs", "batch_size"), donate_argnums=(0,))
def _train_epoch(
    state_L,
    train_x_NxD,
    train_y_N,
    test_x_MxD,
    test_y_M,
    shuffle_key,
    epoch_index,
    learning_rates_L,
    *,
    num_classes: int,
    epochs: int,
    batch_size: int,
):
    """`_epoch` for every rate from `state_L`, on this epoch's train features: `(new state_L,
    metrics)` with a leading axis over the rates. All rates share the minibatch order."""
    return jax.vmap(
        lambda state, learning_rate: _epoch(
            state,
            train_x_NxD,
            train_y_N,
            test_x_MxD,
            test_y_M,
            shuffle_key,
            epoch_index,
            learning_rate,
            num_classes=num_classes,
            epochs=epochs,
            batch_size=batch_size,
        )
    )(state_L, learning_rates_L)


def _epoch(
    state,
    train_x_NxD,
    train_y_N,
    test_x_MxD,
    test_y_M,
    shuffle_key,
    epoch_index,
    learning_rate,
    *,
    num_classes,
    epochs,
    batch_size,
):
    """Epoch `epoch_index` (0-based) of one rate: the shuffled minibatch steps, then the test pass.
    Returns `((params, opt_state), (train_loss, train_correct, test_top1, test_top5, test_loss))`,
    correct counts as integers."""
    num_train = train_x_NxD.shape[0]
    steps_per_epoch = _steps_per_epoch(num_train, batch_size)
    padded = steps_per_epoch * batch_size
    optimizer = _optimizer(learning_rate, epochs, steps_per_epoch)

    def batch_loss(params, x_BxD, y_B, mask_B):
        logits_BxC = _logits(params, x_BxD)
        losses_B = optax.softmax_cross_entropy_with_integer_labels(logits_BxC, y_B)
        # Mean over the real rows only: the reference's short last batch averages over its own size.
        count = jnp.sum(mask_B)
        loss = jnp.sum(losses_B * mask_B) / count
        correct = jnp.sum((jnp.argmax(logits_BxC, -1) == y_B) & (mask_B > 0))
        return loss, (correct, count)

    def train_step(carry, step_inputs):
        params, opt_state = carry
        index_B, mask_B = step_inputs
        # Indices are always in range (padding points at row 0): "clip" skips the out-of-bounds
        # fill that plain indexing adds to every gather, ~10% of a step on a CPU.
        x_BxD = jnp.take(train_x_NxD, index_B, axis=0, mode="clip")
        y_B = jnp.take(train_y_N, index_B, axis=0, mode="clip")
        (loss, (correct, count)), grads = jax.value_and_grad(batch_loss, has_aux=True)(
            params, x_BxD, y_B, mask_B
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), (loss * count, correct, count)

    def evaluate(params):
        logits_MxC = _logits(params, test_x_MxD)
        loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits_MxC, test_y_M))
        top5_MxK = jax.lax.top_k(logits_MxC, min(5, num_classes))[1]
        # Counts, not fractions: percentages are formed on the host in float64, so 100% is exact.
        top1 = jnp.sum(top5_MxK[:, 0] == test_y_M)
        top5 = jnp.sum(jnp.any(top5_MxK == test_y_M[:, None], axis=1))
        return top1, top5, loss

    order = minibatch_order(shuffle_key, epoch_index, num_train)
    index_SxB = jnp.pad(order, (0, padded - num_train)).reshape(steps_per_epoch, batch_size)
    mask_SxB = (jnp.arange(padded) < num_train).reshape(steps_per_epoch, batch_size)
    (params, opt_state), (loss_sums, corrects, counts) = jax.lax.scan(
        train_step, state, (index_SxB, mask_SxB.astype(jnp.float32))
    )
    train_loss = jnp.sum(loss_sums) / num_train
    train_correct = jnp.sum(corrects)
    test_top1, test_top5, test_loss = evaluate(params)
    return (params, opt_state), (train_loss, train_correct, test_top1, test_top5, test_loss)


def linear_probe(
    train_features,
    train_labels,
    test_features,
    test_labels,
    *,
    num_classes: int,
    epochs: int,
    batch_size: int,
    base_lrs: Sequence[float],
    seed: int = 0,
) -> list[LinearProbeResult]:
    """Trains a linear classifier on `train_features` and tests it, the reference's protocol, once
    per base learning rate (the paper swept the rate: "we sweep the learning rate"; pick with
    `best_of`). The rates run vmapped in one program from the same initial weights and minibatch
    order, so they differ in the rate alone; that costs about `len(base_lrs)` single runs on a CPU,
    much less on an accelerator, which a single run leaves mostly idle.

    Args:
      train_features: `(N, D)` float features, used as they are (the reference does not normalise).
      train_labels: `(N,)` integer labels in `[0, num_classes)`.
      test_features, test_labels: `(M, D)` and `(M,)`, evaluated after every epoch.
      num_classes: output width.
      epochs: training epochs (the reference: 100); the cosine schedule spans them.
      batch_size: minibatch size (the reference: 128 per GPU). The learning rate is
        `base_lr * batch_size / 256`.
      base_lrs: learning rates per 256 examples (the reference: 0.001).
      seed: initialisation and shuffling; the same seed gives the same result.
    """
    train_x, train_y, test_x, test_y = inputs.feature_splits(
        "linear_probe", train_features, train_labels, test_features, test_labels, num_classes
    )
    train_x = jnp.asarray(train_x)
    return _train(
        lambda epoch: train_x, train_y, test_x, test_y, num_classes, epochs, batch_size, base_lrs, seed
    )


def linear_probe_augmented(
    train_features_for_epoch: Callable[[int], tuple[np.ndarray, np.ndarray]],
    test_features,
    test_labels,
    *,
    num_classes: int,
    epochs: int,
    batch_size: int,
    base_lrs: Sequence[float],
    seed: int = 0,
) -> list[LinearProbeResult]:
    """`linear_probe` trained on new train features every epoch: the reference's probe on
    augmented images (RandomResizedCrop + flip through the frozen backbone).

    `train_features_for_epoch(epoch)` (epoch 0-based) returns `(features (N, D), labels (N,))` of
    that epoch's views of the N train images, row i always a view of image i (same labels every
    epoch). Everything else (initialisation, minibatch order, optimizer, per-epoch cosine schedule,
    test pass) is `linear_probe`'s: a function that returns the same features every epoch gives
    `linear_probe`'s result on them. Every rate trains on the same features, so the views (the
    expensive part) are computed once per epoch.
    """
    train_x, train_y, test_x, test_y = inputs.feature_splits(
        "linear_probe_augmented", *train_features_for_epoch(0), test_features, test_labels, num_classes
    )

    def features_of(epoch: int):
        if epoch == 0:
            return train_x
        epoch_x, epoch_y, _, _ = inputs.feature_splits(
            "linear_probe_augmented", *train_features_for_epoch(epoch), test_x, test_y, num_classes
        )
        if epoch_x.shape != train_x.shape or not np.array_equal(epoch_y, train_y):
            raise ValueError(
                f"linear_probe_augmented: epoch {epoch} gave features {epoch_x.shape} and "
                f"labels unlike epoch 0's (features {train_x.shape}); expected row i to be a "
                "view of train image i every epoch"
            )
        return epoch_x

    return _train(features_of, train_y, test_x, test_y, num_classes, epochs, batch_size, base_lrs, seed)


def _train(
    train_x_for_epoch, train_y, test_x, test_y, num_classes, epochs, batch_size, base_lrs, seed
) -> list[LinearProbeResult]:
    """The one driver: `epochs` calls of `_train_epoch`, each on `train_x_for_epoch(epoch)`."""
    num_train = len(train_y)
    learning_rates, batch_size = _check_settings(epochs, batch_size, base_lrs, num_train)
    learning_rates_L = jnp.asarray(learning_rates, jnp.float32)
    static = {"num_classes": int(num_classes), "epochs": int(epochs), "batch_size": batch_size}
    state_L, shuffle_key = _initial_state(
        jax.random.key(seed),
        learning_rates_L,
        dim=int(test_x.shape[1]),
        num_classes=int(num_classes),
        epochs=int(epochs),
        steps_per_epoch=_steps_per_epoch(num_train, batch_size),
    )
    train_y_N, test_x_MxD, test_y_M = jnp.asarray(train_y), jnp.asarray(test_x), jnp.asarray(test_y)
    per_epoch = []
    for epoch in range(epochs):
        # Dispatched without waiting: the next epoch's features are made while this one trains.
        state_L, metrics = _train_epoch(
            state_L,
            jnp.asarray(train_x_for_epoch(epoch)),
            train_y_N,
            test_x_MxD,
            test_y_M,
            shuffle_key,
            jnp.asarray(epoch, jnp.int32),
            learning_rates_L,
            **static,
        )
        per_epoch.append(metrics)
    # Per metric, (L, epochs).
    stacked = tuple(jnp.stack(values, axis=1) for values in zip(*per_epoch))
    return _results(stacked, learning_rates, num_train, len(test_y))


def _check_settings(epochs, batch_size, base_lrs, num_train) -> tuple[list[float], int]:
    """-> (learning rates, minibatch size), or a ValueError naming the bad setting."""
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"linear_probe: epochs={epochs}, batch_size={batch_size}; expected both >= 1")
    base_lrs = tuple(float(lr) for lr in base_lrs)
    if not base_lrs or min(base_lrs) <= 0:
        raise ValueError(f"linear_probe: base_lrs={base_lrs}; expected one or more rates > 0")
    # The rate follows the requested batch size, as in the reference, even when the data set is
    # smaller than one batch (the step shape is then clamped to the data set: no wasted padding).
    learning_rates = [scaled_learning_rate(batch_size, lr) for lr in base_lrs]
    return learning_rates, int(min(batch_size, num_train))


def _results(per_epoch, learning_rates, num_train: int, num_test: int) -> list[LinearProbeResult]:
    """`LinearProbeResult`s from the per-epoch metrics of `_epoch`, each `(L, epochs)`."""
    train_loss, train_correct, test_correct, test_correct5, test_loss = (np.asarray(v) for v in per_epoch)
    results = []
    for i, learning_rate in enumerate(learning_rates):
        train_top1 = 100.0 * train_correct[i].astype(np.float64) / num_train
        test_top1 = 100.0 * test_correct[i].astype(np.float64) / num_test
        test_top5 = 100.0 * test_correct5[i].astype(np.float64) / num_test
        best = int(np.argmax(test_top1))
        results.append(
            LinearProbeResult(
                test_top1=float(test_top1[-1]),
                test_top5=float(test_top5[-1]),
                test_loss=float(test_loss[i, -1]),
                best_test_top1=float(test_top1[best]),
                best_epoch=best + 1,
                train_top1=float(train_top1[-1]),
                train_loss=float(train_loss[i, -1]),
                learning_rate=learning_rate,
                test_top1_per_epoch=test_top1,
                train_loss_per_epoch=train_loss[i],
            )
        )
    return results


def best_of(results: Sequence[LinearProbeResult]) -> LinearProbeResult:
    """The run with the highest best-epoch test top-1 (the reference's selection criterion; the
    first on ties)."""
    return max(results, key=lambda result: result.best_test_top1)
