"""What a config means: value checks with clear errors, the one adapter from the config to the
typed specs the library takes, a run's saved config, and the conversion of epochs into steps.

The keys and their defaults live in `dino_jax/configs/base.py`. `validate` runs before any data is
read or any array is built, and reports every bad value at once, naming the key, the value and what
was expected.
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


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError listing every problem found in `config`."""
    from dino_jax.data import image_folder, pipeline, sources
    from dino_jax.eval import fewshot, suite
    from dino_jax.models import vit

    problems: list[str] = []

    def check(ok: bool, key: str, value, expected: str):
        if not ok:
            problems.append(f"config.{key} = {value!r}: expected {expected}")

    d, m, h, a, t, e = config.dataset, config.model, config.head, config.augment, config.train, config.eval
    names = sorted(sources.DATASETS) + [image_folder.FOLDER]
    check(d.name in names, "dataset.name", d.name, f"one of {names}")
    if d.name == image_folder.FOLDER:
        check(
            bool(d.train_dir) and os.path.isdir(os.path.expanduser(d.train_dir)),
            "dataset.train_dir",
            d.train_dir,
            "a folder of images, or of class subfolders of images (dataset.name='folder')",
        )
        check(
            not d.test_dir or os.path.isdir(os.path.expanduser(d.test_dir)),
            "dataset.test_dir",
            d.test_dir,
            '"" (no test split) or a folder of class subfolders named as in dataset.train_dir',
        )
        check(
            isinstance(d.image_size, int) and d.image_size >= 0,
            "dataset.image_size",
            d.image_size,
            "0 (augment.global_crop_size) or the side in pixels the folder's images are stored at",
        )
        check(not d.synthetic, "dataset.synthetic", d.synthetic, "False: a folder has no shape to imitate")
        check(
            not d.classes,
            "dataset.classes",
            d.classes,
            "() with a folder: its class subfolders are its classes (a folder of the ones wanted)",
        )
    else:
        for key in ("train_dir", "test_dir", "image_size"):
            check(not d[key], f"dataset.{key}", d[key], "unset: only dataset.name='folder' reads it")
    for key in ("mean", "std"):
        value = d[key]
        check(len(value) == 3, f"dataset.{key}", value, "3 numbers (R, G, B)")
    check(all(s > 0 for s in d.std), "dataset.std", d.std, "positive numbers")
    check(isinstance(d.synthetic, bool), "dataset.synthetic", d.synthetic, "True or False")
    if d.name in sources.DATASETS:
        num = sources.DATASETS[d.name].num_classes
        labels = tuple(d.classes)
        check(
            all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c < num for c in labels)
            and len(set(labels)) == len(labels)
            and len(labels) != 1,
            "dataset.classes",
            d.classes,
            f"() for every class, or at least 2 distinct labels of {d.name} in [0, {num - 1}]",
        )

    check(m.variant in vit.VIT_VARIANTS, "model.variant", m.variant, f"one of {sorted(vit.VIT_VARIANTS)}")
    check(m.patch_size > 0, "model.patch_size", m.patch_size, "a positive integer")
    custom = (m.embed_dim, m.depth, m.num_heads)
    check(
        all(v == 0 for v in custom) or all(v > 0 for v in custom),
        "model.embed_dim/depth/num_heads",
        custom,
        "all three 0 (use the variant's) or all three positive",
    )
    if m.embed_dim > 0 and m.num_heads > 0:
        check(
            m.embed_dim % m.num_heads == 0,
            "model.embed_dim",
            m.embed_dim,
            f"a multiple of model.num_heads ({m.num_heads})",
        )
    check(0 <= m.drop_path_rate < 1, "model.drop_path_rate", m.drop_path_rate, "a rate in [0, 1)")
    check(isinstance(m.scan_blocks, bool), "model.scan_blocks", m.scan_blocks, "True or False")
    check(
        m.dtype == AUTO_DTYPE or m.dtype in vit.COMPUTE_DTYPES,
        "model.dtype",
        m.dtype,
        f"{AUTO_DTYPE!r} (by device) or one of {vit.COMPUTE_DTYPES}",
    )

    check(h.out_dim > 0, "head.out_dim", h.out_dim, "a positive integer")
    check(h.nlayers >= 1, "head.nlayers", h.nlayers, "at least 1")
    check(
        h.hidden_dim > 0 and h.bottleneck_dim > 0,
        "head.hidden_dim/bottleneck_dim",
        (h.hidden_dim, h.bottleneck_dim),
        "positive integers",
    )

    check(a.on in pipeline.AUGMENT_PLACES, "augment.on", a.on, f"one of {pipeline.AUGMENT_PLACES}")
    if m.patch_size > 0:
        for key in ("global_crop_size", "local_crop_size"):
            size = a[key]
            check(
                size > 0 and size % m.patch_size == 0,
                f"augment.{key}",
                size,
                f"a positive multiple of the patch size {m.patch_size} "
                f"(crop size {size} is not a multiple of patch size {m.patch_size})",
            )
    check(a.num_local_crops >= 0, "augment.num_local_crops", a.num_local_crops, "0 or more")
    for key in ("global_crop_scale", "local_crop_scale"):
        lo, hi = a[key]
        check(0 < lo <= hi <= 1, f"augment.{key}", a[key], "(low, high) with 0 < low <= high <= 1")
    for key in ("crop_aspect_ratio", "blur_sigma"):
        lo, hi = a[key]
        check(0 < lo <= hi, f"augment.{key}", a[key], "(low, high) with 0 < low <= high")
    for key in ("flip_p", "color_jitter_p", "grayscale_p", "solarize_p"):
        check(0 <= a[key] <= 1, f"augment.{key}", a[key], "a probability in [0, 1]")
    check(
        len(a.blur_p) == 3 and all(0 <= p <= 1 for p in a.blur_p),
        "augment.blur_p",
        a.blur_p,
        "3 probabilities (global 1, global 2, local)",
    )
    for key in ("brightness", "contrast", "saturation"):
        check(a[key] >= 0, f"augment.{key}", a[key], "a non-negative jitter strength")
    check(0 <= a.hue <= 0.5, "augment.hue", a.hue, "a hue jitter in [0, 0.5]")
    check(a.num_workers >= 0, "augment.num_workers", a.num_workers, "0 or more worker processes")

    check(t.batch_size > 0, "train.batch_size", t.batch_size, "a positive integer")
    check(t.epochs > 0, "train.epochs", t.epochs, "a positive integer")
    check(t.max_steps >= 0, "train.max_steps", t.max_steps, "0 (no limit) or a positive step count")
    check(t.lr > 0, "train.lr", t.lr, "a positive learning rate")
    check(0 <= t.min_lr <= t.lr, "train.min_lr", t.min_lr, f"in [0, train.lr={t.lr}]")
    check(
        0 <= t.warmup_epochs <= t.epochs,
        "train.warmup_epochs",
        t.warmup_epochs,
        f"in [0, train.epochs={t.epochs}]",
    )
    check(
        0 <= t.warmup_teacher_temp_epochs <= t.epochs,
        "train.warmup_teacher_temp_epochs",
        t.warmup_teacher_temp_epochs,
        f"in [0, train.epochs={t.epochs}]",
    )
    check(
        0 <= t.freeze_last_layer <= t.epochs,
        "train.freeze_last_layer",
        t.freeze_last_layer,
        f"in [0, train.epochs={t.epochs}] epochs",
    )
    check(
        t.weight_decay >= 0 and t.weight_decay_end >= 0,
        "train.weight_decay/weight_decay_end",
        (t.weight_decay, t.weight_decay_end),
        "non-negative values",
    )
    check(t.clip_grad >= 0, "train.clip_grad", t.clip_grad, "0 (off) or a positive norm")
    check(0 <= t.momentum_teacher <= 1, "train.momentum_teacher", t.momentum_teacher, "in [0, 1]")
    check(0 <= t.center_momentum < 1, "train.center_momentum", t.center_momentum, "in [0, 1)")
    for key in ("warmup_teacher_temp", "teacher_temp", "student_temp"):
        check(t[key] > 0, f"train.{key}", t[key], "a positive temperature")
    check(
        isinstance(t.compilation_cache_dir, str),
        "train.compilation_cache_dir",
        t.compilation_cache_dir,
        'a directory, or "" for none',
    )
    for key in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
        check(t[key] > 0, f"train.{key}", t[key], "a positive integer")
    check(
        all(name in LOG_DESTINATIONS for name in t.log_to) and len(set(t.log_to)) == len(t.log_to),
        "train.log_to",
        t.log_to,
        f"distinct names from {LOG_DESTINATIONS}, or () for the console only",
    )

    check(e.batch_size > 0, "eval.batch_size", e.batch_size, "a positive integer")
    check(
        len(e.knn_ks) > 0 and all(k > 0 for k in e.knn_ks),
        "eval.knn_ks",
        e.knn_ks,
        "one or more positive neighbour counts",
    )
    check(e.knn_temperature > 0, "eval.knn_temperature", e.knn_temperature, "a positive temperature")
    for key in ("evaluators", "transfer_evaluators"):
        check(
            all(name in suite.EVALUATORS for name in e[key]),
            f"eval.{key}",
            e[key],
            f"names from {tuple(suite.EVALUATORS)}",
        )
    check(
        all(name in sources.DATASETS for name in e.transfer),
        "eval.transfer",
        e.transfer,
        f"dataset names from {sorted(sources.DATASETS)}",
    )
    for key in (
        "linear_epochs",
        "linear_batch_size",
        "linear_n_last_blocks",
        "fewshot_k_shot",
        "fewshot_n_query",
        "fewshot_episodes",
    ):
        check(e[key] > 0, f"eval.{key}", e[key], "a positive integer")
    check(e.linear_base_lr > 0, "eval.linear_base_lr", e.linear_base_lr, "a positive learning rate")
    check(
        all(lr > 0 for lr in e.linear_base_lrs),
        "eval.linear_base_lrs",
        e.linear_base_lrs,
        "() or positive learning rates",
    )
    for key in ("linear_augment", "linear_avgpool"):
        check(isinstance(e[key], bool), f"eval.{key}", e[key], "True or False")
    if e.linear_avgpool is True:
        check(
            e.linear_n_last_blocks == 1,
            "eval.linear_n_last_blocks",
            e.linear_n_last_blocks,
            "1 with eval.linear_avgpool=True (the reference pools the last block only)",
        )
    check(
        e.fewshot_n_way == 0 or e.fewshot_n_way >= 2,
        "eval.fewshot_n_way",
        e.fewshot_n_way,
        "0 (every class) or at least 2 classes",
    )
    check(
        len(e.fewshot_classifiers) > 0 and all(name in fewshot.CLASSIFIERS for name in e.fewshot_classifiers),
        "eval.fewshot_classifiers",
        e.fewshot_classifiers,
        f"one or more of {fewshot.CLASSIFIERS}",
    )
    check(
        e.fewshot_logreg_max_way >= 0,
        "eval.fewshot_logreg_max_way",
        e.fewshot_logreg_max_way,
        "0 or more classes",
    )
    check(
        e.attention_every_steps >= 0,
        "eval.attention_every_steps",
        e.attention_every_steps,
        "0 (with the kNN monitor) or a positive step count",
    )
    check(
        e.monitor_every_epochs >= 0,
        "eval.monitor_every_epochs",
        e.monitor_every_epochs,
        "0 (off) or a positive number of epochs",
    )
    for key in ("monitor_train_images", "monitor_test_images", "monitor_knn_k"):
        check(e[key] > 0, f"eval.{key}", e[key], "a positive integer")
    check(
        e.monitor_knn_k <= e.monitor_train_images,
        "eval.monitor_knn_k",
        e.monitor_knn_k,
        f"at most eval.monitor_train_images ({e.monitor_train_images})",
    )
    for key in ("monitor_student", "report"):
        check(isinstance(e[key], bool), f"eval.{key}", e[key], "True or False")

    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


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
