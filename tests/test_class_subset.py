"""`dataset.classes`: a run on some classes of its dataset (sources.ClassSubset), checked on the
synthetic source here and on a real-format Tiny-ImageNet build in test_datasets_real_format.py."""

import pickle

import numpy as np
import pytest

from configs import cifar100, tiny_imagenet
from dino_jax import config as config_lib, config_validation
from dino_jax.data import sources


def test_a_subset_keeps_the_classes_images_in_order_relabelled_by_position():
    full = sources.synthetic_source("stl10", "test")  # 8,000 images, 10 classes
    labels = sources.split_labels("stl10", "test", synthetic=True)
    assert labels.shape == (8000,) and [full[i]["label"] for i in range(50)] == labels[:50].tolist()

    subset = sources.open_split("stl10", "test", synthetic=True, classes=(7, 2))
    kept = np.flatnonzero((labels == 7) | (labels == 2))
    assert len(subset) == len(kept) and 0 < len(kept) < 8000
    for position in (0, 1, len(kept) - 1):
        original = full[int(kept[position])]
        record = subset[position]
        np.testing.assert_array_equal(record["image"], original["image"])
        assert record["label"] == {7: 0, 2: 1}[original["label"]]
    batch = subset.__getitems__([3, 0])
    assert [r["label"] for r in batch] == [subset[3]["label"], subset[0]["label"]]
    assert {subset[i]["label"] for i in range(40)} == {0, 1}
    again = pickle.loads(pickle.dumps(subset))
    np.testing.assert_array_equal(again[5]["image"], subset[5]["image"])
    with pytest.raises(IndexError, match="out of range"):
        subset[len(kept)]


def test_subset_arguments_are_checked():
    source = sources.synthetic_source("stl10", "test")
    labels = sources.split_labels("stl10", "test", synthetic=True)
    for classes in ((), (3, 3), (-1, 2)):
        with pytest.raises(ValueError, match="distinct labels"):
            sources.ClassSubset(source, classes, labels)
    with pytest.raises(ValueError, match="7999 labels for a source of 8000"):
        sources.ClassSubset(source, (1, 2), labels[:-1])


def test_the_config_subsets_the_runs_dataset_only_and_counts_its_classes():
    config = tiny_imagenet.get_config()
    config.dataset.synthetic = True
    config.dataset.classes = classes = tuple(range(0, 200, 10))
    config_validation.validate(config)
    assert config_lib.num_classes(config) == 20
    assert config_lib.num_classes(config, "stl10") == 10  # a transfer dataset stays whole
    train = config_lib.open_split(config, "train")
    assert isinstance(train, sources.ClassSubset) and train.classes == classes
    labels = sources.split_labels("tiny_imagenet", "train", synthetic=True)
    assert len(train) == np.isin(labels, classes).sum()
    assert not isinstance(config_lib.open_split(config, "train", "stl10"), sources.ClassSubset)


@pytest.mark.parametrize("classes", [(5,), (0, 0), (0, 100), (-1, 3), (True, 2), (1.0, 2)])
def test_bad_class_lists_are_named(classes):
    config = cifar100.get_config()
    config.dataset.classes = classes
    with pytest.raises(config_lib.ConfigError, match=r"config\.dataset\.classes = .*in \[0, 99\]"):
        config_validation.validate(config)


@pytest.mark.parametrize("arg", ["cpu", "cpu,smoke"])
def test_the_cpu_recipe_is_valid_and_trains_on_twenty_classes(arg):
    config = tiny_imagenet.get_config(arg)
    config_validation.validate(config)
    assert config_lib.num_classes(config) == 20 and tuple(config.dataset.classes) == tuple(range(0, 200, 10))
    assert config.augment.global_crop_size // config.model.patch_size == 4  # 16 tokens a global crop
