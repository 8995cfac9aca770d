"""Tests of the linear probe and few-shot episodes (kNN: test_knn.py, features: test_features.py)."""

import numpy as np
import pytest

from dino_jax.eval import fewshot, linear


pytestmark = pytest.mark.usefixtures("fast_compilation")


def _clusters(rng, num_classes, per_class, dim, spread, centres=None):
    centres = rng.standard_normal((num_classes, dim)) if centres is None else centres
    labels = np.repeat(np.arange(num_classes), per_class)
    features = centres[labels] + spread * rng.standard_normal((len(labels), dim))
    return features.astype(np.float32), labels, centres


# ---------------------------------------------------------------------------------------------
# Linear probe.


def test_linear_probe_separates_clusters():
    rng = np.random.default_rng(0)
    # 256-d: squared feature norms in the hundreds, like real ViT features, so the protocol's
    # small learning rate still makes fast progress.
    train_x, train_y, centres = _clusters(rng, 6, 50, 256, 0.3)
    test_x, test_y, _ = _clusters(rng, 6, 20, 256, 0.3, centres)
    (result,) = linear.linear_probe(
        train_x, train_y, test_x, test_y, num_classes=6, epochs=10, batch_size=32, base_lrs=(0.001,)
    )
    assert result.test_top1 == 100.0
    assert result.best_test_top1 == 100.0
    assert result.train_top1 > 95.0
    assert result.test_top5 == 100.0
    assert result.train_loss_per_epoch[-1] < result.train_loss_per_epoch[0]
    assert result.test_top1_per_epoch.shape == (10,)
    assert 1 <= result.best_epoch <= 10
    metrics = result.metrics()
    assert set(metrics) == {
        "linear_test_top1",
        "linear_test_top5",
        "linear_test_loss",
        "linear_best_test_top1",
        "linear_best_epoch",
        "linear_train_top1",
        "linear_train_loss",
    }


def test_linear_probe_on_random_labels_is_at_chance():
    rng = np.random.default_rng(1)
    train_x = rng.standard_normal((600, 16)).astype(np.float32)
    test_x = rng.standard_normal((1000, 16)).astype(np.float32)
    (result,) = linear.linear_probe(
        train_x,
        rng.integers(0, 5, 600),
        test_x,
        rng.integers(0, 5, 1000),
        num_classes=5,
        epochs=5,
        batch_size=64,
        base_lrs=(0.001,),
    )
    # Chance is 20%; the standard error over 1000 test rows is 1.3%.
    assert abs(result.test_top1 - 20.0) < 6.0


def test_linear_probe_is_deterministic_in_the_seed():
    rng = np.random.default_rng(2)
    x, y, _ = _clusters(rng, 3, 20, 8, 1.0)
    protocol = dict(num_classes=3, epochs=3, batch_size=16, base_lrs=(0.001,), seed=5)
    (first,) = linear.linear_probe(x, y, x, y, **protocol)
    (second,) = linear.linear_probe(x, y, x, y, **protocol)
    np.testing.assert_array_equal(first.train_loss_per_epoch, second.train_loss_per_epoch)


def test_sweep_matches_single_runs_and_picks_the_best():
    rng = np.random.default_rng(8)
    x, y, centres = _clusters(rng, 4, 20, 64, 1.0)
    test_x, test_y, _ = _clusters(rng, 4, 10, 64, 1.0, centres)
    rates = (0.001, 0.03)
    sweep = linear.linear_probe(
        x, y, test_x, test_y, num_classes=4, epochs=4, batch_size=16, base_lrs=rates, seed=2
    )
    for rate, swept in zip(rates, sweep):
        (single,) = linear.linear_probe(
            x, y, test_x, test_y, num_classes=4, epochs=4, batch_size=16, base_lrs=(rate,), seed=2
        )
        assert swept.learning_rate == pytest.approx(rate * 16 / 256)
        np.testing.assert_allclose(swept.train_loss_per_epoch, single.train_loss_per_epoch, rtol=1e-5)
        np.testing.assert_array_equal(swept.test_top1_per_epoch, single.test_top1_per_epoch)
    assert linear.best_of(sweep).best_test_top1 == max(r.best_test_top1 for r in sweep)


def test_augmented_probe_on_fixed_features_is_the_cached_probe():
    rng = np.random.default_rng(4)
    train_x, train_y, centres = _clusters(rng, 4, 25, 16, 1.0)
    test_x, test_y, _ = _clusters(rng, 4, 10, 16, 1.0, centres)
    protocol = dict(num_classes=4, epochs=4, batch_size=32, base_lrs=(0.01, 1.0), seed=7)
    cached = linear.linear_probe(train_x, train_y, test_x, test_y, **protocol)
    epochs_asked = []

    def features_for_epoch(epoch):
        epochs_asked.append(epoch)
        return train_x, train_y

    augmented = linear.linear_probe_augmented(features_for_epoch, test_x, test_y, **protocol)
    # Same init, minibatch order, schedule and optimizer: the same numbers, epoch by epoch.
    assert epochs_asked == [0, 1, 2, 3]
    for ours, theirs in zip(augmented, cached):
        np.testing.assert_allclose(ours.train_loss_per_epoch, theirs.train_loss_per_epoch, rtol=1e-5)
        np.testing.assert_array_equal(ours.test_top1_per_epoch, theirs.test_top1_per_epoch)
        assert ours.best_epoch == theirs.best_epoch and ours.learning_rate == theirs.learning_rate
        assert ours.test_loss == pytest.approx(theirs.test_loss, rel=1e-5)


def test_augmented_probe_trains_on_each_epochs_features():
    rng = np.random.default_rng(5)
    train_x, train_y, centres = _clusters(rng, 3, 20, 8, 0.5)
    test_x, test_y, _ = _clusters(rng, 3, 10, 8, 0.5, centres)
    # Epoch 0's features hold no signal; from epoch 1 on they are the clusters.
    noise = rng.standard_normal(train_x.shape).astype(np.float32)
    (result,) = linear.linear_probe_augmented(
        lambda epoch: (noise if epoch == 0 else train_x, train_y),
        test_x,
        test_y,
        num_classes=3,
        epochs=3,
        batch_size=16,
        base_lrs=(1.0,),
    )
    (on_noise,) = linear.linear_probe(
        noise, train_y, test_x, test_y, num_classes=3, epochs=3, batch_size=16, base_lrs=(1.0,)
    )
    # Epoch 0 is the probe on the noise; the later epochs learn the clusters.
    assert result.train_loss_per_epoch[0] == on_noise.train_loss_per_epoch[0]
    assert result.train_loss_per_epoch[2] < on_noise.train_loss_per_epoch[2] - 0.2
    assert result.test_top1 > on_noise.test_top1 + 30.0
    with pytest.raises(ValueError, match="epoch 1 gave features .* labels unlike epoch 0's"):
        linear.linear_probe_augmented(
            lambda epoch: (train_x, (train_y + epoch) % 3),
            test_x,
            test_y,
            num_classes=3,
            epochs=2,
            batch_size=128,
            base_lrs=(0.001,),
        )


def test_learning_rate_scales_with_batch_size():
    assert linear.scaled_learning_rate(256, 0.001) == pytest.approx(0.001)
    assert linear.scaled_learning_rate(128, 0.001) == pytest.approx(0.0005)
    assert linear.scaled_learning_rate(1024, 0.001) == pytest.approx(0.004)
    rng = np.random.default_rng(3)
    x, y, _ = _clusters(rng, 2, 10, 4, 1.0)
    # The rate follows the requested batch size even when the data set is smaller than a batch.
    (result,) = linear.linear_probe(x, y, x, y, num_classes=2, epochs=1, batch_size=512, base_lrs=(0.001,))
    assert result.learning_rate == pytest.approx(0.002)


def test_schedule_is_cosine_per_epoch_like_torch_cosine_annealing():
    torch = pytest.importorskip("torch")
    epochs, steps_per_epoch, peak = 7, 3, 0.004
    schedule = linear.epoch_cosine_schedule(peak, epochs, steps_per_epoch)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak, momentum=0.9)
    annealing = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=0)
    for epoch in range(epochs):
        expected = optimizer.param_groups[0]["lr"]
        for step in range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch):
            assert float(schedule(step)) == pytest.approx(expected, rel=1e-5, abs=1e-9), (epoch, step)
        optimizer.step()
        annealing.step()
    assert float(schedule(0)) == pytest.approx(peak)


# ---------------------------------------------------------------------------------------------
# Few-shot.

# Every class, 5 support and 15 query images per class: the protocol's episode shape.
EPISODE = dict(n_way=None, k_shot=5, n_query=15)


def test_episodes_are_disjoint_and_of_the_right_classes():
    labels = np.repeat(np.arange(8), 25)
    np.random.default_rng(0).shuffle(labels)
    indices = fewshot.sample_episodes(labels, n_way=4, k_shot=5, n_query=15, episodes=30, seed=1)
    assert indices.shape == (30, 4, 20)
    for episode in indices:
        assert len(np.unique(episode)) == episode.size
        for way in episode:
            assert len(np.unique(labels[way])) == 1
        assert len(np.unique(labels[episode[:, 0]])) == 4
    again = fewshot.sample_episodes(labels, n_way=4, k_shot=5, n_query=15, episodes=30, seed=1)
    np.testing.assert_array_equal(indices, again)


def test_too_few_examples_per_class_is_an_error():
    labels = np.array([0] * 30 + [1] * 12)
    # A user error (launch.py prints it as one line): the data cannot fill the episodes asked for.
    with pytest.raises(fewshot.EpisodeError, match=r"classes \[1\] have fewer than 20"):
        fewshot.sample_episodes(labels, n_way=None, k_shot=5, n_query=15, episodes=2, seed=0)


def test_few_shot_separates_clusters_and_random_labels_give_chance():
    rng = np.random.default_rng(4)
    x, y, _ = _clusters(rng, 5, 40, 16, 0.1)
    results = fewshot.few_shot(x, y, **EPISODE, episodes=50, classifiers=("ncm", "logreg"))
    assert results["fewshot_5shot_ncm"] == 100.0
    assert results["fewshot_5shot_logreg"] == 100.0
    random_y = rng.permutation(y)
    chance = fewshot.few_shot(x, random_y, **EPISODE, episodes=200, classifiers=("ncm", "logreg"))
    for name in ("ncm", "logreg"):
        # 5-way chance is 20%; the interval is the statistical error of the mean.
        assert abs(chance[f"fewshot_5shot_{name}"] - 20.0) < 4.0
        assert chance[f"fewshot_5shot_{name}_ci95"] > 0


def test_confidence_interval_shrinks_with_more_episodes():
    rng = np.random.default_rng(5)
    x, y, _ = _clusters(rng, 4, 40, 8, 1.5)
    few = fewshot.few_shot(x, y, **EPISODE, episodes=40, classifiers=("ncm",), seed=0)
    many = fewshot.few_shot(x, y, **EPISODE, episodes=640, classifiers=("ncm",), seed=0)
    # Width goes as 1/sqrt(episodes): 16 times more episodes, about 4 times narrower.
    ratio = few["fewshot_5shot_ncm_ci95"] / many["fewshot_5shot_ncm_ci95"]
    assert 2.5 < ratio < 6.0
    assert fewshot.mean_and_ci95([50.0, 70.0]) == pytest.approx((60.0, 1.96 * 10.0 / np.sqrt(2)))


def test_logistic_regression_matches_scikit_learn():
    sklearn_linear = pytest.importorskip("sklearn.linear_model")
    rng = np.random.default_rng(6)
    x, y, _ = _clusters(rng, 6, 30, 12, 2.0)
    indices = fewshot.sample_episodes(y, n_way=None, k_shot=5, n_query=15, episodes=8, seed=3)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    expected = []
    for episode in indices:
        support, query = unit[episode[:, :5]], unit[episode[:, 5:]]
        classifier = sklearn_linear.LogisticRegression(C=1.0, tol=1e-10, max_iter=10_000)
        classifier.fit(support.reshape(-1, 12), np.repeat(np.arange(6), 5))
        expected.append(np.mean(classifier.predict(query.reshape(-1, 12)) == np.repeat(np.arange(6), 15)))
    ours = fewshot.few_shot(x, y, **EPISODE, episodes=8, seed=3, classifiers=("logreg",))
    assert ours["fewshot_5shot_logreg"] == pytest.approx(100.0 * np.mean(expected), abs=1e-3)
    assert 0 < ours["fewshot_5shot_logreg"] < 100
