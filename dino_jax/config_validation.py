"""Checks of a config's values, run before any data is read or any array is built: every bad
value reported at once, naming the key, the value and what was expected.

One function over every section of the schema (`dino_jax/configs/base.py`); kept apart from
`config.py`, which says what valid values mean.
"""

from __future__ import annotations

import os

import ml_collections

from dino_jax.config import AUTO_DTYPE, LOG_DESTINATIONS
from dino_jax.errors import ConfigError


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
    check(isinstance(m.pallas_kernels, bool), "model.pallas_kernels", m.pallas_kernels, "True or False")
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
