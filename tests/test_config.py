import json
import os
import subprocess
import sys

import ml_collections
import pytest

from configs import cifar100, digits
from dino_jax import cli, config as config_lib, config_validation
from dino_jax.configs import base

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("get_config", [cifar100.get_config, digits.get_config])
@pytest.mark.parametrize("arg", [None, "smoke"])
def test_shipped_configs_are_valid(get_config, arg):
    config_validation.validate(get_config(arg))


def test_crop_size_not_a_multiple_of_the_patch_size_is_named():
    config = cifar100.get_config()
    config.augment.local_crop_size = 18
    with pytest.raises(config_lib.ConfigError, match="crop size 18 is not a multiple of patch size 4"):
        config_validation.validate(config)


def test_every_bad_value_is_reported_at_once():
    config = digits.get_config()
    config.augment.on = "gpu"
    config.train.lr = -1.0
    config.model.variant = "huge"
    with pytest.raises(config_lib.ConfigError) as error:
        config_validation.validate(config)
    message = str(error.value)
    assert "config.augment.on = 'gpu'" in message and "'host'" in message
    assert "config.train.lr = -1.0" in message
    assert "config.model.variant = 'huge'" in message


def test_folder_dataset_keys_are_checked_together(tmp_path):
    config = cifar100.get_config()
    config.dataset.name = "folder"
    config.dataset.test_dir = str(tmp_path / "missing")
    config.dataset.image_size = -8
    config.dataset.synthetic = True
    config.dataset.classes = (0, 1)
    with pytest.raises(config_lib.ConfigError) as error:
        config_validation.validate(config)
    message = str(error.value)
    assert "config.dataset.train_dir = '': expected a folder of images, or of class subfolders" in message
    assert f"config.dataset.test_dir = '{tmp_path / 'missing'}'" in message
    assert "config.dataset.image_size = -8" in message and "config.dataset.synthetic = True" in message
    assert "config.dataset.classes = (0, 1): expected () with a folder" in message

    (tmp_path / "photos" / "cat").mkdir(parents=True)
    config.dataset.train_dir, config.dataset.test_dir = str(tmp_path / "photos"), ""
    config.dataset.image_size, config.dataset.synthetic, config.dataset.classes = 0, False, ()
    config_validation.validate(config)
    assert config_lib.stored_image_size(config) == 32  # 0: the global crop size
    assert config_lib.num_classes(config) == 1

    named = cifar100.get_config()
    named.dataset.train_dir = str(tmp_path / "photos")  # read only by a folder dataset: a mistake here
    with pytest.raises(config_lib.ConfigError, match="train_dir = .*only dataset.name='folder' reads it"):
        config_validation.validate(named)


def test_linear_augment_must_be_a_bool():
    config = digits.get_config()
    assert config.eval.linear_augment is False
    config.eval.linear_augment = True
    config_validation.validate(config)
    # A config read back from JSON is not type-locked: the check catches what a hand edit leaves.
    as_dict = config.to_dict()
    as_dict["eval"]["linear_augment"] = "yes"
    with pytest.raises(
        config_lib.ConfigError, match="config.eval.linear_augment = 'yes': expected True or False"
    ):
        config_validation.validate(ml_collections.ConfigDict(as_dict))


def test_batch_larger_than_the_dataset_is_explained():
    config = digits.get_config()
    config.train.batch_size = 4096
    with pytest.raises(config_lib.ConfigError, match="larger than the 1437 training images"):
        config_lib.plan_steps(config, 1437)


def test_an_epoch_floors_to_full_batches():
    config = digits.get_config()
    assert config_lib.plan_steps(config, 1437).steps_per_epoch == 22
    config.train.batch_size = 256
    assert config_lib.plan_steps(config, 50000).steps_per_epoch == 195
    config.train.batch_size = 64
    with pytest.raises(config_lib.ConfigError, match="larger than the 10 training images"):
        config_lib.plan_steps(config, 10)


def test_plan_resolves_epochs_into_steps():
    config = cifar100.get_config()
    plan = config_lib.plan_steps(config, 50_000)
    assert plan.steps_per_epoch == 195
    assert plan.schedule_steps == 195 * config.train.epochs
    assert plan.freeze_last_layer_steps == 195
    assert plan.peak_lr == pytest.approx(5e-4)


def launch(*args):
    return subprocess.run(
        [sys.executable, "launch.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_launch_rejects_an_unknown_key_before_any_compute(tmp_path):
    out = launch("--config=configs/digits.py", f"--workdir={tmp_path}", "--config.train.lrr=0.1")
    assert out.returncode != 0
    assert "lrr" in out.stderr
    assert not os.listdir(tmp_path)


def test_launch_rejects_a_bad_value_before_any_compute(tmp_path):
    out = launch(
        "--config=configs/cifar100.py", f"--workdir={tmp_path}", "--config.augment.global_crop_size=30"
    )
    assert out.returncode != 0
    assert "crop size 30 is not a multiple of patch size 4" in out.stderr
    assert not os.listdir(tmp_path)


def test_launch_rejects_an_unknown_recipe_argument_in_one_line(tmp_path):
    out = launch("--config=cifar100:smok", f"--workdir={tmp_path}")  # a recipe by name
    assert out.returncode != 0
    assert out.stderr.strip() == "error: unknown config argument 'smok' (in ':smok'): expected one of smoke"
    assert not os.listdir(tmp_path)


def test_launch_reports_a_missing_config_file_in_one_line(tmp_path):
    out = launch("--config=configs/cifar10.py", f"--workdir={tmp_path}")
    assert out.returncode != 0
    assert out.stderr.strip() == (
        "error: --config=configs/cifar10.py: no such config file, or it cannot be read "
        "(the recipes by name: cifar100, digits, tiny_imagenet)"
    )


def test_a_recipe_name_is_the_packaged_recipe_file_and_a_path_stays_a_path():
    packaged = os.path.join(ROOT, "dino_jax", "configs")
    assert cli.recipe_names() == ["cifar100", "digits", "tiny_imagenet"]
    assert cli.resolve_config("digits") == os.path.join(packaged, "digits.py")
    assert cli.resolve_config("cifar100:smoke") == os.path.join(packaged, "cifar100.py") + ":smoke"
    for path in ("configs/digits.py", "configs/digits.py:smoke", "my_recipe.py", "cifar10"):
        assert cli.resolve_config(path) == path
    argv = ["dino-jax", "--config", "digits:smoke", "--config.train.lr=1", "--workdir=digits"]
    assert cli._with_recipe_paths(argv)[2] == os.path.join(packaged, "digits.py") + ":smoke"
    assert cli._with_recipe_paths(argv)[3:] == argv[3:]


def test_recipe_arguments_are_checked():
    assert base.parse_arg(None) == {} and base.parse_arg("smoke") == {"smoke": True}
    for get_config in (cifar100.get_config, digits.get_config):
        with pytest.raises(config_lib.ConfigError, match="unknown config argument 'fast'"):
            get_config("smoke,fast")


def test_an_older_run_config_loads_onto_todays_defaults(tmp_path):
    saved = digits.get_config().to_dict()
    del saved["dataset"]["synthetic"], saved["eval"]["linear_avgpool"]  # keys added after that run
    (tmp_path / "config.json").write_text(json.dumps(saved))
    config = config_lib.load_run_config(str(tmp_path))
    assert config.dataset.synthetic is False and config.eval.linear_avgpool is False
    assert config.dataset.name == "digits" and tuple(config.eval.knn_ks) == (5, 10, 20, 100, 200)
    config_validation.validate(config)
    with pytest.raises(FileNotFoundError, match="is .* the workdir of a training run"):
        config_lib.load_run_config(str(tmp_path / "elsewhere"))
