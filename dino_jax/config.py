"""The one place that knows config keys: value checks with clear errors, typed sub-configs, and
the conversion of epochs into steps.

`validate` runs before any data is read or any array is built, and reports every bad value at
once, naming the key, the value and what was expected.
"""

from __future__ import annotations

import dataclasses

import ml_collections


class ConfigError(ValueError):
    """A config value is wrong; the message names every bad key."""


_DTYPES = ("float32", "bfloat16")
_AUGMENT_PLACES = ("host", "device")


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError listing every problem found in `config`."""
    from dino_jax.data import sources
    from dino_jax.models import vit

    problems: list[str] = []

    def check(ok: bool, key: str, value, expected: str):
        if not ok:
            problems.append(f"config.{key} = {value!r}: expected {expected}")

    d, m, h, a, t, e = config.dataset, config.model, config.head, config.augment, config.train, config.eval
    check(d.name in sources.DATASETS, "dataset.name", d.name, f"one of {sorted(sources.DATASETS)}")
    for key in ("mean", "std"):
        value = d[key]
        check(len(value) == 3, f"dataset.{key}", value, "3 numbers (R, G, B)")
    check(all(s > 0 for s in d.std), "dataset.std", d.std, "positive numbers")
    check(isinstance(d.synthetic, bool), "dataset.synthetic", d.synthetic, "True or False")

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
    check(m.dtype in _DTYPES, "model.dtype", m.dtype, f"one of {_DTYPES}")

    check(h.out_dim > 0, "head.out_dim", h.out_dim, "a positive integer")
    check(h.nlayers >= 1, "head.nlayers", h.nlayers, "at least 1")
    check(
        h.hidden_dim > 0 and h.bottleneck_dim > 0,
        "head.hidden_dim/bottleneck_dim",
        (h.hidden_dim, h.bottleneck_dim),
        "positive integers",
    )

    check(a.on in _AUGMENT_PLACES, "augment.on", a.on, f"one of {_AUGMENT_PLACES}")
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

    check(e.batch_size > 0, "eval.batch_size", e.batch_size, "a positive integer")
    check(
        len(e.knn_ks) > 0 and all(k > 0 for k in e.knn_ks),
        "eval.knn_ks",
        e.knn_ks,
        "one or more positive neighbour counts",
    )
    check(e.knn_temperature > 0, "eval.knn_temperature", e.knn_temperature, "a positive temperature")
    known_evaluators = ("knn", "linear", "fewshot")
    for key in ("evaluators", "transfer_evaluators"):
        check(
            all(name in known_evaluators for name in e[key]),
            f"eval.{key}",
            e[key],
            f"names from {known_evaluators}",
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
    check(isinstance(e.linear_augment, bool), "eval.linear_augment", e.linear_augment, "True or False")
    check(
        e.attention_every_steps >= 0,
        "eval.attention_every_steps",
        e.attention_every_steps,
        "0 (off) or a positive step count",
    )

    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def vit_config(config: ml_collections.ConfigDict, *, drop_path: bool):
    """The backbone's typed config; `drop_path=False` for the teacher and evaluation."""
    from dino_jax.models import vit

    m = config.model
    overrides = dict(
        image_size=config.augment.global_crop_size,
        patch_size=m.patch_size,
        drop_path_rate=m.drop_path_rate if drop_path else 0.0,
        dtype=m.dtype,
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
        solarize_p=(0.0, a.solarize_p, 0.0),
    )


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
