"""The synthetic data source: random images shaped like a dataset, read by the real pipeline and
trainer, so speed can be measured and recipes tried without the data."""

import json
import os
import pickle

import numpy as np
import pytest

from dino_jax.data import sources
from tests.test_launch import launch


@pytest.mark.parametrize("name", ["cifar100", "tiny_imagenet", "stl10"])
def test_synthetic_split_has_the_datasets_shape_size_and_classes(name):
    spec = sources.DATASETS[name]
    train = sources.synthetic_source(name, spec.train_split)
    test = sources.synthetic_source(name, spec.eval_split)
    assert (len(train), len(test)) == (spec.num_train, spec.num_eval)
    examples = train.__getitems__(list(range(400)))
    images = np.stack([ex["image"] for ex in examples])
    labels = np.array([ex["label"] for ex in examples])
    assert images.dtype == np.uint8 and images.shape == (400, spec.image_size, spec.image_size, 3)
    assert labels.min() >= 0 and labels.max() < spec.num_classes
    # Labels spread over the classes (400 draws over 10-200 classes) and pixels span the range.
    assert len(set(labels.tolist())) >= min(spec.num_classes, 400) * 0.6
    assert images.min() == 0 and images.max() == 255


def test_synthetic_examples_are_deterministic_distinct_and_picklable():
    train = sources.synthetic_source("cifar100", "train")
    again = pickle.loads(pickle.dumps(sources.synthetic_source("cifar100", "train")))
    for index in (0, 1, 49_999):
        np.testing.assert_array_equal(train[index]["image"], again[index]["image"])
        assert train[index]["label"] == again[index]["label"]
    assert not np.array_equal(train[0]["image"], train[1]["image"])
    test = sources.synthetic_source("cifar100", "test")
    assert not np.array_equal(train[0]["image"], test[0]["image"])
    with pytest.raises(IndexError, match="out of range"):
        train[50_000]


def test_synthetic_split_errors_name_the_dataset_or_split():
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        sources.synthetic_source("imagenet", "train")
    with pytest.raises(ValueError, match="no split 'validation'"):
        sources.synthetic_source("cifar100", "validation")


def test_open_split_reads_no_file_when_synthetic(tmp_path):
    empty = str(tmp_path / "no_datasets_here")
    source = sources.open_split("cifar100", "train", data_dir=empty, synthetic=True)
    assert isinstance(source, sources.SyntheticSource) and len(source) == 50_000
    assert not os.path.exists(empty)
    # The same call without `synthetic` looks for the real dataset there (and, offline, says so).
    with pytest.raises(sources.DatasetUnavailableError, match="cifar100"):
        sources.open_split("cifar100", "train", data_dir=empty)


@pytest.mark.slow
def test_launch_trains_and_evaluates_a_recipe_on_synthetic_data_without_the_dataset(tmp_path):
    workdir, data_dir = str(tmp_path / "run"), str(tmp_path / "no_data")
    out = launch(
        "--config=configs/cifar100.py:smoke",
        f"--workdir={workdir}",
        f"--config.dataset.data_dir={data_dir}",
        "--config.dataset.synthetic=True",
        "--config.train.max_steps=4",
        "--config.train.log_every_steps=2",
        "--config.eval.random_init_knn=False",
        "--config.eval.evaluators=('knn',)",
        "--config.eval.transfer=()",
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert "SYNTHETIC DATA" in out.stderr
    assert not os.path.exists(data_dir)
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    assert results["synthetic_data"] == 1.0
    assert 0.0 <= results["knn_k20_top1"] <= 100.0
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [row["step"] for row in rows] == [2, 4]
    assert all(row["images_per_s"] > 0 for row in rows)
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["dataset"]["synthetic"] is True
