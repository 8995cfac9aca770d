"""What a config means: the one adapter from the config to the typed specs the library takes,
the data it names, a run's saved config, and the conversion of epochs into steps.

The keys and their defaults live in `dino_jax/configs/base.py`; `config_validation.validate` checks
their values first, every bad value at once.
"""

from __future__ import annotations

import dataclasses
import json
import os

import ml_collections

from dino_jax.errors import ConfigError

CONFIG_FILE = "config.json"
LOG_DESTINATIONS = ("jsonl", "tensorboard")  # train.log_to
# model.dtype's default: resolved to a concrete dtype for the devices at the start of a run
# (precision.py), which imports this module, so the name lives here.
AUTO_DTYPE = "auto"


def vit_config(config: ml_collections.ConfigDict, *, drop_path: bool):
    """The backbone's typed config; `drop_path=False` for the teacher and evaluation. Raises
    ConfigError for `model.dtype="auto"`, which only a run resolves (`precision.resolved_config`)."""
    from dino_jax.models import vit

    m = config.model
    if m.dtype == AUTO_DTYPE:
        raise ConfigError(
            "config.model.dtype = 'auto': a model needs a concrete compute dtype; resolve it for the "
            "devices first (dino_jax.precision.resolved_config, as train.Trainer does) or set float32, "
            "bfloat16 or float16"
        )
    overrides = dict(
        image_size=config.augment.global_crop_size,
        patch_size=m.patch_size,
        drop_path_rate=m.drop_path_rate if drop_path else 0.0,
        dtype=m.dtype,
        scan_blocks=m.scan_blocks,
        pallas_kernels=m.pallas_kernels,
    )
    if m.embed_dim:
        overrides.update(embed_dim=m.embed_dim, depth=m.depth, num_heads=m.num_heads)
    return vit.ViTConfig.from_variant(m.variant, **overrides)


def head_config(config: ml_collections.ConfigDict, in_dim: int):
    from dino_jax.models import head

    h = config.head
    return head.HeadConfig(
        in_dim=in_dim,
        out_dim=h.out_dim,
        hidden_dim=h.hidden_dim,
        bottleneck_dim=h.bottleneck_dim,
        nlayers=h.nlayers,
        use_bn=h.use_bn,
        norm_last_layer=h.norm_last_layer,
        # The compute dtype of the backbone, as the reference's AMP runs its head in fp16 too.
        dtype=config.model.dtype,
    )


def crop_config(config: ml_collections.ConfigDict):
    from dino_jax.data.multicrop import spec

    a = config.augment
    return spec.MultiCropConfig(
        global_size=a.global_crop_size,
        local_size=a.local_crop_size,
        num_local_crops=a.num_local_crops,
        global_scale=tuple(a.global_crop_scale),
        local_scale=tuple(a.local_crop_scale),
        flip_p=a.flip_p,
        color_jitter_p=a.color_jitter_p,
        brightness=a.brightness,
        contrast=a.contrast,
        saturation=a.saturation,
        hue=a.hue,
        grayscale_p=a.grayscale_p,
        blur_p=tuple(a.blur_p),
        blur_sigma=tuple(a.blur_sigma),
        solarize_p=(0.0, a.solarize_p, 0.0),
        aspect_ratio=tuple(a.crop_aspect_ratio),
    )


def suite_settings(config: ml_collections.ConfigDict):
    """The evaluation suite's protocol (`eval.suite.SuiteSettings`) from `config.eval`."""
    from dino_jax.eval import suite

    e = config.eval
    return suite.SuiteSettings(
        evaluators=tuple(e.evaluators),
        transfer_evaluators=tuple(e.transfer_evaluators),
        knn_ks=tuple(e.knn_ks),
        knn_temperature=e.knn_temperature,
        linear_n_last_blocks=e.linear_n_last_blocks,
        linear_avgpool=e.linear_avgpool,
        linear_epochs=e.linear_epochs,
        linear_batch_size=e.linear_batch_size,
        linear_base_lrs=tuple(e.linear_base_lrs) or (e.linear_base_lr,),
        linear_augment=e.linear_augment,
        fewshot_n_way=e.fewshot_n_way or None,
        fewshot_k_shot=e.fewshot_k_shot,
        fewshot_n_query=e.fewshot_n_query,
        fewshot_episodes=e.fewshot_episodes,
        fewshot_classifiers=tuple(e.fewshot_classifiers),
        fewshot_logreg_max_way=e.fewshot_logreg_max_way,
        seed=config.seed,
    )


def open_split(config: ml_collections.ConfigDict, which: str, dataset: str | None = None):
    """The `which` split of `dataset` (default: the run's) where the config says the data is: in
    `dataset.data_dir`, random images shaped like it (`dataset.synthetic`), or a folder of images
    (`dataset.train_dir` / `test_dir`, decoded once into `<data_dir>/image_folders/`). `which`:
    "pretrain" (what training reads), "train" or "eval" (what the evaluation fits and tests on).
    Raises DatasetUnavailableError when it is missing."""
    from dino_jax.data import folder_cache, image_folder, sources

    name = dataset or config.dataset.name
    if name == image_folder.FOLDER:
        d = config.dataset
        data_dir = os.path.expanduser(d.data_dir or sources.default_data_dir())
        return folder_cache.open_split(
            which,
            train_dir=d.train_dir,
            test_dir=d.test_dir,
            image_size=stored_image_size(config),
            cache_root=os.path.join(data_dir, folder_cache.CACHE_FOLDER),
        )
    spec = sources.DATASETS[name]
    split = spec.split(which)
    # An unlabelled pretraining split (every label -1) has no classes to pick from.
    subset = name == config.dataset.name and split != spec.pretrain_split
    return sources.open_split(
        name,
        split,
        data_dir=config.dataset.data_dir or None,
        synthetic=config.dataset.synthetic,
        classes=tuple(config.dataset.classes) if subset else (),
    )


def stored_image_size(config: ml_collections.ConfigDict) -> int:
    """Side of the run's stored square images: a folder's `dataset.image_size` (0: the global
    crop size), a named dataset's own size otherwise."""
    from dino_jax.data import image_folder, sources

    if config.dataset.name == image_folder.FOLDER:
        return config.dataset.image_size or config.augment.global_crop_size
    return sources.DATASETS[config.dataset.name].image_size


def num_classes(config: ml_collections.ConfigDict, dataset: str | None = None) -> int:
    """The class count of `dataset` (default: the run's) as `open_split` serves it: the length of
    `dataset.classes` for the run's dataset when that is set."""
    from dino_jax.data import image_folder, sources

    name = dataset or config.dataset.name
    if name == image_folder.FOLDER:  # the training folder's class subfolders; 0 when it has none
        return len(image_folder.class_names(config.dataset.train_dir))
    if name == config.dataset.name and config.dataset.classes:
        return len(config.dataset.classes)
    return sources.DATASETS[name].num_classes


def save_run_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Writes `<workdir>/config.json`, which `load_run_config` reads back (process 0 only)."""
    from dino_jax import distributed

    if not distributed.is_primary():
        return
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
        f.write(config.to_json_best_effort(indent=2))


def has_run_config(workdir: str) -> bool:
    return os.path.isfile(os.path.join(workdir, CONFIG_FILE))


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a training run in `workdir` used: its `config.json` onto today's defaults, so a
    run saved before a key existed still loads (with that key's default)."""
    from dino_jax.configs import base

    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: is {workdir} the workdir of a training run?")
    with open(path) as f:
        saved = json.load(f)
    config = base.get_config()
    config.update(saved)
    return config


def monitor_every_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
    """The kNN monitor's interval in steps (at least 1), or 0 when it is off."""
    epochs = config.eval.monitor_every_epochs
    return max(1, round(epochs * steps_per_epoch)) if epochs > 0 else 0


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """Durations resolved once into steps; the training loop only knows steps."""

    steps_per_epoch: int
    schedule_steps: int  # epochs * steps_per_epoch: the length of every schedule
    train_steps: int  # what this run executes (max_steps may stop it early)
    freeze_last_layer_steps: int
    peak_lr: float  # lr * batch / 256


def plan_steps(config: ml_collections.ConfigDict, num_train_examples: int) -> StepPlan:
    t = config.train
    steps_per_epoch = num_train_examples // t.batch_size  # drop_last, like the reference
    if steps_per_epoch == 0:
        raise ConfigError(
            f"config.train.batch_size = {t.batch_size}: larger than the {num_train_examples} training "
            "images, so an epoch has no full batch"
        )
    schedule_steps = t.epochs * steps_per_epoch
    train_steps = min(schedule_steps, t.max_steps) if t.max_steps else schedule_steps
    return StepPlan(
        steps_per_epoch=steps_per_epoch,
        schedule_steps=schedule_steps,
        train_steps=train_steps,
        freeze_last_layer_steps=t.freeze_last_layer * steps_per_epoch,
        peak_lr=t.lr * t.batch_size / 256.0,
    )


def check_divisible(global_batch: int, num_devices: int, what: str = "config.train.batch_size") -> None:
    if global_batch % num_devices:
        raise ConfigError(
            f"{what} = {global_batch}: expected a multiple of the {num_devices} devices, "
            f"so every device gets the same number of images"
        )
