"""Tests of the evaluation suite: evaluators wired together, metric names, and their report."""

import json

import numpy as np
import pytest

from dino_jax.eval import report, suite
from tests.config_helpers import suite_settings


pytestmark = pytest.mark.usefixtures("fast_compilation")


_FAST = suite_settings(
    knn_ks=(5, 20, 500), linear_epochs=3, linear_batch_size=32, fewshot_episodes=20, linear_n_last_blocks=2
)


def _split_features(name, rng, num_classes, centres, spread=0.2):
    def draw(per_class):
        labels = np.repeat(np.arange(num_classes), per_class)
        blocks = np.concatenate([centres[labels], centres[labels]], axis=1)
        return (blocks + spread * rng.standard_normal(blocks.shape)).astype(np.float32), labels

    train_blocks, train_labels = draw(30)
    test_blocks, test_labels = draw(25)
    dim = centres.shape[1]
    return suite.SplitFeatures(
        name,
        num_classes,
        train_blocks[:, -dim:],
        train_blocks,
        train_labels,
        test_blocks[:, -dim:],
        test_blocks,
        test_labels,
    )


def test_evaluate_features_names_and_values():
    rng = np.random.default_rng(0)
    main = _split_features("digits", rng, 4, rng.standard_normal((4, 64)))
    transfer = _split_features("stl10", rng, 3, rng.standard_normal((3, 64)))
    results = suite.evaluate_features(main, [transfer], _FAST)
    for key in (
        "knn_k5_top1",
        "knn_k20_top5",
        "linear_test_top1",
        "linear_best_test_top1",
        "linear_train_loss",
        "linear_test_loss",
        "fewshot_5shot_ncm",
        "fewshot_5shot_ncm_ci95",
        "fewshot_5shot_logreg",
        "stl10_knn_k20_top1",
        "stl10_linear_test_top1",
        "stl10_fewshot_5shot_ncm_ci95",
    ):
        assert key in results, key
    # k=500 exceeds the 120 training rows: left out rather than failing the suite.
    assert "knn_k500_top1" not in results
    assert results["knn_k20_top1"] == 100.0
    assert results["stl10_fewshot_5shot_ncm"] == 100.0

    markdown = report.results_markdown(
        results,
        main_name="digits",
        transfer_names=["stl10"],
        settings=_FAST,
        command="python launch.py --mode=eval",
    )
    assert markdown.count("Command: `python launch.py --mode=eval`") == 4
    assert "| 20 | 100.00 | 100.00 |" in markdown
    assert "k = [500] not computed" in markdown
    assert "| stl10 | 100.00 |" in markdown


def test_linear_rate_sweep_reports_the_chosen_rate():
    rng = np.random.default_rng(3)
    data = _split_features("sweep", rng, 3, rng.standard_normal((3, 16)), spread=1.0)
    settings = suite_settings(
        evaluators=("linear",), linear_epochs=2, linear_batch_size=16, linear_base_lrs=(1e-4, 0.1)
    )
    results = suite.evaluate_features(data, (), settings)
    assert results["linear_base_lr"] in (1e-4, 0.1)
    markdown = report.results_markdown(results, main_name="sweep", settings=settings, command="x")
    assert "best of base rates [0.0001, 0.1]" in markdown


def test_unknown_evaluator_is_rejected():
    with pytest.raises(ValueError, match=r"unknown evaluators \['svm'\]"):
        suite_settings(evaluators=("knn", "svm"))


def test_logreg_is_skipped_for_wide_episodes():
    rng = np.random.default_rng(1)
    data = _split_features("wide", rng, 4, rng.standard_normal((4, 8)))
    settings = suite_settings(evaluators=("fewshot",), fewshot_episodes=5, fewshot_logreg_max_way=3)
    results = suite.evaluate_features(data, (), settings)
    assert "fewshot_5shot_ncm" in results and "fewshot_5shot_logreg" not in results


def test_evaluate_backbone_end_to_end_on_a_tiny_vit(tmp_path):
    from flax import nnx
    from dino_jax.models.vit import ViTConfig, VisionTransformer

    model = VisionTransformer(
        ViTConfig(image_size=8, patch_size=4, embed_dim=8, depth=2, num_heads=2), rngs=nnx.Rngs(0)
    )
    graphdef, params = nnx.split(model)
    rng = np.random.default_rng(2)

    # Class = a flat colour: trivially separable even for random features.
    def batches(count):
        labels = np.arange(count) % 3
        images = (
            np.zeros((count, 8, 8, 3), np.uint8)
            + (labels * 100)[:, None, None, None].astype(np.uint8)
            + rng.integers(0, 5, (count, 8, 8, 3), dtype=np.uint8)
        )
        for start in range(0, count, 16):
            chunk = slice(start, start + 16)
            size = len(labels[chunk])
            yield {
                "image": np.pad(images[chunk], ((0, 16 - size), (0, 0), (0, 0), (0, 0))),
                "label": np.pad(labels[chunk], (0, 16 - size)),
                "mask": np.arange(16) < size,
            }

    data = suite.EvalData("colours", 3, lambda: batches(60), lambda: batches(63))
    settings = suite_settings(knn_ks=(5,), linear_epochs=2, linear_n_last_blocks=4, fewshot_episodes=10)
    results, extracted = suite.evaluate_backbone(
        graphdef, params, data, mean=(0.5,), std=(0.25,), settings=settings
    )
    # With a transfer data set, and the report's two files.
    out_dir = tmp_path / "workdir"
    ran, _ = suite.evaluate_backbone(
        graphdef, params, data, [data], mean=(0.5,), std=(0.25,), settings=settings
    )
    markdown = report.results_markdown(
        ran, main_name="colours", transfer_names=["colours"], settings=settings, command="python launch.py"
    )
    report.write_results(str(out_dir), ran, markdown)
    assert json.loads((out_dir / "results.json").read_text())["colours_knn_k5_top1"] == 100.0
    assert "## Transfer" in (out_dir / "results.md").read_text()
    assert ran["knn_k5_top1"] == results["knn_k5_top1"]
    # The linear feature is capped at the depth (2 blocks of 8), the kNN feature is the last 8.
    assert extracted[0].train_blocks.shape == (60, 16)
    assert extracted[0].test_cls.shape == (63, 8)
    np.testing.assert_allclose(extracted[0].test_cls, extracted[0].test_blocks[:, 8:])
    assert results["knn_k5_top1"] == 100.0
    assert "linear_test_top1" in results and "fewshot_5shot_ncm" in results
    assert results["linear_n_last_blocks"] == 2
    # Without the linear probe one block is enough.
    _, knn_only = suite.evaluate_backbone(
        graphdef,
        params,
        data,
        mean=(0.5,),
        std=(0.25,),
        settings=suite_settings(evaluators=("knn",), knn_ks=(5,)),
    )
    assert knn_only[0].train_blocks.shape == (60, 8)
    assert "CLS of the last 2 blocks" in report.results_markdown(
        results, main_name="colours", settings=settings, command="x"
    )


def _tiny_vit():
    from flax import nnx
    from dino_jax.models.vit import ViTConfig, VisionTransformer

    model = VisionTransformer(
        ViTConfig(image_size=8, patch_size=4, embed_dim=8, depth=2, num_heads=2), rngs=nnx.Rngs(0)
    )
    return nnx.split(model)


def _image_data(name, train, test, *, batch_size=32):
    from dino_jax.data import pipeline

    return suite.EvalData(
        name,
        3,
        lambda: pipeline.eval_batches(train, batch_size=batch_size, image_size=8),
        lambda: pipeline.eval_batches(test, batch_size=batch_size, image_size=8),
        lambda seed, epoch: pipeline.linear_probe_batches(
            train, batch_size=batch_size, image_size=8, seed=seed, epoch=epoch
        ),
    )


def test_augmented_linear_probe_on_a_tiny_vit():
    graphdef, params = _tiny_vit()
    rng = np.random.default_rng(4)
    colours = np.array([[220, 30, 30], [30, 220, 30], [30, 30, 220]], np.uint8)

    # Class = a flat colour with a little noise, 12 px: every crop of an image keeps its class.
    def flat(count):
        labels = np.arange(count) % 3
        images = colours[labels][:, None, None, :] + rng.integers(0, 8, (count, 12, 12, 3), dtype=np.uint8)
        return [{"image": image, "label": label} for image, label in zip(images, labels)]

    # Pixels and labels drawn independently: nothing to learn.
    def noise(count):
        images = rng.integers(0, 256, (count, 12, 12, 3), dtype=np.uint8)
        return [{"image": image, "label": label} for image, label in zip(images, rng.integers(0, 3, count))]

    # A random-init ViT's features hold the colour as a ~10% deviation from one shared vector: the
    # protocol's plain SGD on them needs a high rate and ~10 epochs (then 100% to the end).
    settings = suite_settings(
        evaluators=("linear",),
        linear_epochs=20,
        linear_batch_size=16,
        linear_base_lrs=(3.0,),
        linear_n_last_blocks=2,
        linear_augment=True,
    )
    evaluate = lambda data, settings: suite.evaluate_backbone(  # noqa: E731
        graphdef, params, data, mean=(0.5,), std=(0.25,), settings=settings
    )[0]
    separable = evaluate(_image_data("colours", flat(60), flat(60)), settings)
    assert separable["linear_test_top1"] == 100.0
    assert separable["linear_train_top1"] == 100.0
    assert "RandomResizedCrop + flip view" in report.results_markdown(
        separable, main_name="colours", settings=settings, command="x"
    )
    # Chance is 33%; the standard error over 300 test images is 2.7%.
    random = evaluate(_image_data("noise", noise(90), noise(300)), settings)
    assert abs(random["linear_test_top1"] - 100 / 3) < 12.0

    # linear_augment=False: the cached-feature probe, whether or not views could be made.
    data = _image_data("colours", flat(30), flat(30))
    plain = suite.dataclasses.replace(settings, linear_augment=False)
    without_views = suite.dataclasses.replace(data, augmented_train_batches=None)
    metrics = lambda data: {  # noqa: E731  # wall times left out
        key: value for key, value in evaluate(data, plain).items() if not key.endswith("_s")
    }
    assert metrics(data) == metrics(without_views)
    assert "RandomResizedCrop" not in report.results_markdown(
        metrics(data), main_name="colours", settings=plain, command="x"
    )


def test_augmented_probe_needs_the_images():
    rng = np.random.default_rng(6)
    features = _split_features("cached", rng, 3, rng.standard_normal((3, 8)))
    settings = suite_settings(evaluators=("linear",), linear_epochs=1, linear_augment=True)
    with pytest.raises(ValueError, match="linear_augment=True, but the cached features have no augmented"):
        suite.evaluate_features(features, (), settings)


def test_avgpool_linear_feature_keeps_the_knn_feature_and_the_episode_width():
    graphdef, params = _tiny_vit()
    rng = np.random.default_rng(7)
    images = [{"image": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), "label": i % 3} for i in range(48)]
    data = _image_data("noise", images, images, batch_size=16)
    settings = suite_settings(
        evaluators=("knn", "linear", "fewshot"),
        knn_ks=(5,),
        linear_epochs=1,
        linear_n_last_blocks=1,
        linear_avgpool=True,
        fewshot_n_way=2,
        fewshot_k_shot=2,
        fewshot_n_query=3,
        fewshot_episodes=4,
    )

    def evaluate(settings):
        return suite.evaluate_backbone(graphdef, params, data, mean=(0.5,), std=(0.25,), settings=settings)

    results, extracted = evaluate(settings)
    _, plain = evaluate(suite_settings(evaluators=("knn",), knn_ks=(5,)))
    # CLS and mean patch token interleaved; the CLS columns are the kNN feature.
    assert extracted[0].train_blocks.shape == (48, 16)
    np.testing.assert_allclose(extracted[0].train_cls, plain[0].train_cls, rtol=1e-6)
    assert results["linear_n_last_blocks"] == 1
    assert "fewshot_2shot_ncm" in results and "fewshot_2shot_logreg" in results
    assert "CLS and mean patch token of the last block" in report.results_markdown(
        results, main_name="noise", settings=settings, command="x"
    )
