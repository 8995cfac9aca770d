"""Checks shared by the evaluators that take cached features: one error wording for all."""

from __future__ import annotations

import numpy as np


def feature_splits(caller: str, train_features, train_labels, test_features, test_labels, num_classes: int):
    """-> float32 `(N, D)`, int32 `(N,)`, float32 `(M, D)`, int32 `(M,)`, or a ValueError that names
    `caller` and what was expected: same feature width, at least one row per split, one label per
    row, labels in `[0, num_classes)`."""
    train_x = np.asarray(train_features, np.float32)
    test_x = np.asarray(test_features, np.float32)
    train_y = np.asarray(train_labels).astype(np.int32)
    test_y = np.asarray(test_labels).astype(np.int32)
    if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
        raise ValueError(
            f"{caller}: features have shapes {train_x.shape} (train) and "
            f"{test_x.shape} (test); expected (N, D) and (M, D) with the same D"
        )
    if num_classes < 1:
        raise ValueError(f"{caller}: num_classes={num_classes}; expected >= 1")
    for name, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
        if len(x) == 0 or y.shape != (len(x),):
            raise ValueError(
                f"{caller}: {name} has {len(x)} feature rows and labels of shape "
                f"{y.shape}; expected at least one row and one integer label per row"
            )
        if y.min() < 0 or y.max() >= num_classes:
            raise ValueError(
                f"{caller}: {name} labels span [{y.min()}, {y.max()}]; expected "
                f"integers in [0, {num_classes - 1}] for num_classes={num_classes}"
            )
    return train_x, train_y, test_x, test_y
