"""Training and evaluation on a folder of image files (`dataset.name="folder"`), end to end: a
labelled folder through `train.run` and `--mode=eval`, an unlabelled one through launch.py as a
user types it. Tiny model, tiny images; the data-level behaviour is in tests/test_image_folder.py."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from configs import cifar100
from dino_jax import train
from dino_jax.modes import eval as eval_mode

pytestmark = pytest.mark.usefixtures("fast_compilation")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTE = "note: no kNN monitor, untrained kNN baseline, kNN, linear probe or few-shot on this run's data"


def _photo(seed, height, width, mode):
    """Two colour families per seed parity, so the classes differ in something a network can see."""
    rng = np.random.default_rng(seed)
    base = np.array([200, 60, 40] if seed % 2 else [40, 90, 200], np.int64)
    pixels = np.clip(base + rng.integers(-40, 40, (height, width, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels).convert(mode)


def _write_folder(root, per_class, classes=("red", "blue")):
    """Class subfolders (or, with classes=(), a flat folder) of JPEGs and PNGs of several sizes and
    modes; seeds of one parity per class."""
    os.makedirs(root, exist_ok=True)
    for label, name in enumerate(classes or (None,)):
        folder = os.path.join(root, name) if name else root
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            seed = 2 * i + (1 - label)  # red: odd seeds
            size = (20 + 3 * i, 28 - 2 * i)
            if i % 3 == 0:
                _photo(seed, *size, "L").save(os.path.join(folder, f"{i}.png"))
            else:
                _photo(seed, *size, "RGB").save(os.path.join(folder, f"{i}.jpg"), quality=90)


def _tiny(config, data_dir):
    config.dataset.data_dir = data_dir  # where the decoded copies go
    config.model.embed_dim, config.model.depth, config.model.num_heads = 32, 1, 2
    config.model.dtype = "float32"
    config.head.out_dim, config.head.hidden_dim, config.head.bottleneck_dim = 128, 32, 16
    config.augment.global_crop_size, config.augment.local_crop_size = 16, 8
    config.augment.num_local_crops = 2
    config.train.batch_size = 4
    config.train.max_steps = 3
    config.train.log_every_steps = 1
    config.train.compilation_cache_dir = ""
    config.train.log_to = ("jsonl",)
    config.eval.batch_size = 4
    config.eval.knn_ks = (3,)
    config.eval.transfer = ()
    config.eval.linear_epochs = 2
    config.eval.fewshot_k_shot, config.eval.fewshot_n_query, config.eval.fewshot_episodes = 1, 1, 5
    return config


def test_a_labelled_folder_trains_evaluates_reports_and_runs_mode_eval(tmp_path):
    _write_folder(str(tmp_path / "train"), per_class=6)
    _write_folder(str(tmp_path / "test"), per_class=3)
    config = _tiny(cifar100.get_config("smoke"), str(tmp_path / "data"))
    config.dataset.name = "folder"
    config.dataset.train_dir, config.dataset.test_dir = str(tmp_path / "train"), str(tmp_path / "test")
    config.augment.on = "host"
    config.eval.monitor_every_epochs = 1.0  # 12 images, batch 4: at step 3, and before step 0
    config.eval.monitor_knn_k = 3
    workdir = tmp_path / "run"

    results = train.run(config, str(workdir))
    for key in ("knn_k3_top1", "random_init_knn_k3_top1", "linear_best_test_top1", "fewshot_1shot_ncm"):
        assert 0 <= results[key] <= 100, key
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert [r["step"] for r in rows if "monitor_teacher_knn_k3_top1" in r] == [0, 3]
    assert os.path.exists(workdir / "report" / "features_pca.png")  # the report's feature map
    copies = os.listdir(tmp_path / "data" / "image_folders")
    assert sorted(name.split("-")[0] for name in copies) == ["test", "train"]

    evaluated = eval_mode.run(None, str(workdir), str(tmp_path / "eval"))
    assert evaluated["knn_k3_top1"] == results["knn_k3_top1"]  # the same teacher, the same images


def test_an_unlabelled_folder_trains_through_launch_and_says_once_why_it_is_not_evaluated(tmp_path):
    _write_folder(str(tmp_path / "photos"), per_class=8, classes=())
    workdir = tmp_path / "run"
    flags = [
        "--config=configs/cifar100.py:smoke",
        f"--workdir={workdir}",
        "--config.dataset.name=folder",
        f"--config.dataset.train_dir={tmp_path / 'photos'}",
        "--config.dataset.image_size=20",  # stored larger than the 16 px global crops
        f"--config.dataset.data_dir={tmp_path / 'data'}",
        "--config.augment.on=device",
        "--config.model.embed_dim=32",
        "--config.model.depth=1",
        "--config.model.num_heads=2",
        "--config.model.dtype=float32",
        "--config.head.out_dim=128",
        "--config.head.hidden_dim=32",
        "--config.head.bottleneck_dim=16",
        "--config.augment.global_crop_size=16",
        "--config.augment.local_crop_size=8",
        "--config.augment.num_local_crops=2",
        "--config.train.batch_size=4",
        "--config.train.max_steps=2",  # 8 images, batch 4: the whole epoch
        "--config.train.log_every_steps=1",
        "--config.train.compilation_cache_dir=",
        "--config.train.log_to=('jsonl',)",
        "--config.eval.transfer=()",
    ]
    out = subprocess.run(
        [sys.executable, "launch.py", *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS="1"),
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stderr.count(NOTE) == 1, out.stderr[-4000:]
    assert "has no class subfolders (it is unlabelled)" in out.stderr
    assert "decoding 8 images into 20x20 squares" in out.stderr
    results = json.load(open(workdir / "results.json"))
    assert "final_loss" in results and not any(key.startswith(("knn_", "random_init")) for key in results)
    assert "Not evaluated: the folder" in (workdir / "results.md").read_text()
    page = (workdir / "report.html").read_text()
    assert "2 of 2 steps" in page and "has no class subfolders" in page  # why there is no feature map
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
