"""Training runs on CIFAR-100 and Tiny-ImageNet datasets in their real on-disk formats, built in a
temp data dir by the real builders (tests/test_datasets_real_format.py), with host and device
augmentation, through `train.run` as launch.py calls it."""

import json
import os

import pytest

from configs import cifar100, tiny_imagenet as tiny_imagenet_config
from dino_jax import train
from dino_jax.data import sources, tiny_imagenet
from tests import test_datasets_real_format as real


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("real_format")
    data_dir = str(root / "tfds")
    archive = root / "cifar-100-binary.tar.gz"
    real._cifar100_archive(archive, num_train=24, num_test=10)
    stl10_archive = root / "stl10_binary.tar.gz"
    real._stl10_archive(stl10_archive, num_train=6, num_test=5, num_unlabeled=2)
    with pytest.MonkeyPatch.context() as monkeypatch:
        real._build_catalog("cifar100", data_dir, str(archive), monkeypatch)
    with pytest.MonkeyPatch.context() as monkeypatch:
        real._build_catalog("stl10", data_dir, str(stl10_archive), monkeypatch)
    manual = root / "tfds" / "downloads" / "manual"
    manual.mkdir(parents=True)
    real._tiny_imagenet_zip(manual / tiny_imagenet.ZIP_NAME)
    return data_dir


def tiny_run_config(get_config, data_dir, augment_on):
    config = get_config("smoke")
    config.dataset.data_dir = data_dir
    config.augment.on = augment_on
    config.augment.num_local_crops = 2
    config.model.embed_dim, config.model.depth, config.model.num_heads = 32, 1, 2
    config.head.out_dim, config.head.hidden_dim, config.head.bottleneck_dim = 128, 32, 16
    config.train.batch_size = 4
    config.train.max_steps = 2
    config.train.log_every_steps = 1
    config.eval.batch_size = 4
    config.eval.knn_ks = (3,)
    config.eval.evaluators = ("knn", "linear")
    config.eval.transfer = ("stl10",)
    config.eval.transfer_evaluators = ("knn",)
    config.eval.linear_epochs = 2
    return config


@pytest.mark.parametrize("augment_on", ["host", "device"])
@pytest.mark.parametrize(
    "name,get_config", [("cifar100", cifar100.get_config), ("tiny_imagenet", tiny_imagenet_config.get_config)]
)
def test_trains_from_real_format_tfds_datasets(data_dir, tmp_path, monkeypatch, name, get_config, augment_on):
    # Everything is prepared: the run must not look for the internet.
    monkeypatch.setattr(sources, "has_internet", lambda *a, **k: pytest.fail("network probed"))
    config = tiny_run_config(get_config, data_dir, augment_on)
    results = train.run(config, str(tmp_path))
    assert 0 <= results["knn_k3_top1"] <= 100 and 0 <= results["random_init_knn_k3_top1"] <= 100
    assert 0 <= results["stl10_knn_k3_top1"] <= 100  # 96 px STL-10 resized to the model's size
    assert "linear_best_test_top1" in results
    with open(tmp_path / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["loss"] > 0 for r in rows)
    assert os.path.isdir(tmp_path / "checkpoints" / "2")
