"""Tests of the weighted kNN evaluator against a direct numpy transcription of the protocol."""

import numpy as np
import pytest

from dino_jax.eval.knn import weighted_knn


def _brute_force_knn(train_x, train_y, test_x, test_y, num_classes, ks, temperature):
    """The protocol written plainly: full sort of every similarity row, one k at a time."""
    train_n = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    test_n = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
    similarity = test_n.astype(np.float64) @ train_n.astype(np.float64).T
    order = np.argsort(-similarity, axis=1, kind="stable")
    results = {}
    for k in ks:
        hits1 = hits5 = 0
        for row in range(len(test_x)):
            scores = np.zeros(num_classes)
            for j in order[row, :k]:
                scores[train_y[j]] += np.exp(similarity[row, j] / temperature)
            predicted = np.argsort(-scores, kind="stable")
            hits1 += predicted[0] == test_y[row]
            hits5 += test_y[row] in predicted[: min(5, k)]
        results[f"knn_k{k}_top1"] = 100.0 * hits1 / len(test_x)
        results[f"knn_k{k}_top5"] = 100.0 * hits5 / len(test_x)
    return results


def _clusters(rng, num_classes, per_class, dim, spread):
    centres = rng.standard_normal((num_classes, dim))
    labels = np.repeat(np.arange(num_classes), per_class)
    features = centres[labels] + spread * rng.standard_normal((len(labels), dim))
    return features.astype(np.float32), labels


@pytest.mark.parametrize("chunk_size", [None, 8])
def test_matches_brute_force_on_random_data(chunk_size):
    rng = np.random.default_rng(0)
    num_classes, ks = 7, (1, 3, 5, 10, 40)
    # Weakly clustered data so that accuracies are neither 0 nor 100 and ranks matter.
    train_x, train_y = _clusters(rng, num_classes, 30, 16, 2.0)
    test_x, test_y = _clusters(rng, num_classes, 6, 16, 2.0)
    test_x, test_y = test_x[:37], test_y[:37]  # 37 is not a multiple of the chunk size
    expected = _brute_force_knn(train_x, train_y, test_x, test_y, num_classes, ks, 0.07)
    got = weighted_knn(
        train_x,
        train_y,
        test_x,
        test_y,
        num_classes=num_classes,
        ks=ks,
        temperature=0.07,
        chunk_size=chunk_size,
    )
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert got[name] == pytest.approx(value), name
    assert 0 < got["knn_k10_top1"] < 100


def test_well_separated_clusters_are_classified_perfectly():
    # One draw of 45 points per class around shared centres; the last 5 of each class are the test.
    features, labels = _clusters(np.random.default_rng(1), 10, 45, 32, 0.05)
    is_test = np.arange(len(labels)) % 45 >= 40
    results = weighted_knn(
        features[~is_test],
        labels[~is_test],
        features[is_test],
        labels[is_test],
        num_classes=10,
        ks=(5, 20),
        temperature=0.07,
    )
    assert results["knn_k5_top1"] == 100.0
    assert results["knn_k20_top1"] == 100.0


def test_random_labels_give_chance():
    rng = np.random.default_rng(3)
    num_classes = 10
    train_x = rng.standard_normal((2000, 16)).astype(np.float32)
    test_x = rng.standard_normal((1000, 16)).astype(np.float32)
    train_y = rng.integers(0, num_classes, 2000)
    test_y = rng.integers(0, num_classes, 1000)
    results = weighted_knn(
        train_x, train_y, test_x, test_y, num_classes=num_classes, ks=(20,), temperature=0.07
    )
    # Chance is 10% top-1 and 50% top-5; 1000 test rows give a standard error of about 1% and 1.6%.
    assert abs(results["knn_k20_top1"] - 10.0) < 5.0
    assert abs(results["knn_k20_top5"] - 50.0) < 8.0


def test_top5_is_at_least_top1_and_small_test_sets_work():
    rng = np.random.default_rng(4)
    train_x, train_y = _clusters(rng, 12, 10, 8, 1.5)
    for num_test in (1, 3, 37):
        test_x = rng.standard_normal((num_test, 8)).astype(np.float32)
        test_y = rng.integers(0, 12, num_test)
        results = weighted_knn(
            train_x, train_y, test_x, test_y, num_classes=12, ks=(1, 2, 5, 20), temperature=0.07
        )
        for k in (1, 2, 5, 20):
            assert results[f"knn_k{k}_top5"] >= results[f"knn_k{k}_top1"]
        # With one neighbour only one class gets a vote: "top-5" is over min(5, k) = 1 class.
        assert results["knn_k1_top5"] == results["knn_k1_top1"]


def test_k_larger_than_train_set_is_an_error():
    x = np.ones((4, 3), np.float32)
    y = np.zeros(4, np.int32)
    with pytest.raises(ValueError, match=r"ks=\(5,\).*\[1, 4\]"):
        weighted_knn(x, y, x, y, num_classes=2, ks=(5,), temperature=0.07)


def test_labels_outside_num_classes_are_an_error():
    x = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match=r"train labels span \[0, 3\]; expected integers in \[0, 2\]"):
        weighted_knn(x, np.array([0, 1, 2, 3]), x, np.zeros(4), num_classes=3, ks=(1,), temperature=0.07)
