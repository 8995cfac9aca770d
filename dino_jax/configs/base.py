"""Every config key and its default: the one schema of a run.

The recipes beside this file (`cifar100.py`, `digits.py`, `tiny_imagenet.py`; `configs/` in a
checkout re-exports them) start from `get_config()` and change what their dataset needs. Every key
exists here, so a misspelled key in a recipe or in `--config.x=y` fails (the config is locked);
`dino_jax/config.py` checks the values and turns them into typed specs, and
`config.load_run_config` reads a run's saved `config.json` onto these defaults. The defaults are the
reference's (`main_dino.py`, `eval_knn.py`, `eval_linear.py`; docs/reference.md) where they make
sense for every dataset.
"""

from __future__ import annotations

import ml_collections

from dino_jax.data.normalize import IMAGENET_MEAN, IMAGENET_STD
from dino_jax.errors import ConfigError


def parse_arg(arg: str | None, allowed: tuple[str, ...] = ("smoke",)) -> dict[str, bool]:
    """`"smoke"` -> `{"smoke": True}`, as in `--config=configs/x.py:smoke`; tokens are
    comma-separated and each must be one of `allowed`, so a typo fails instead of running the full
    recipe."""
    tokens = [name for name in (arg or "").split(",") if name]
    unknown = [name for name in tokens if name not in allowed]
    if unknown:
        raise ConfigError(
            f"unknown config argument {unknown[0]!r} (in ':{arg}'): expected one of {', '.join(allowed)}"
        )
    return {name: True for name in tokens}


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.dataset = ml_collections.ConfigDict()
    c.dataset.name = "cifar100"  # a named dataset (data/sources.py), or "folder": your own images
    c.dataset.data_dir = ""  # "" = $TFDS_DATA_DIR or ~/tensorflow_datasets
    # dataset.name="folder": train_dir holds class subfolders of images (labelled: kNN, linear and
    # few-shot can run with a test_dir) or the images themselves (unlabelled: training only);
    # test_dir, optional, holds class subfolders named as in train_dir. Their images, of any size
    # and format, are decoded once into squares of image_size px (the largest centred square,
    # resized bicubic; 0 = augment.global_crop_size), kept in <data_dir>/image_folders/ and
    # rebuilt when a file changes (dino_jax/data/folder_cache.py).
    c.dataset.train_dir = ""
    c.dataset.test_dir = ""
    c.dataset.image_size = 0
    # True: random images shaped like the dataset (size, split lengths, classes) instead of its
    # files, to measure speed or try a recipe without the data. Losses and accuracies mean nothing.
    c.dataset.synthetic = False
    # () = every class; else the labels to keep (e.g. `tuple(range(0, 200, 20))`): training and
    # evaluation on the run's dataset see only their images, relabelled 0 .. len(classes) - 1 in
    # this order. Transfer datasets are not subset.
    c.dataset.classes = ()
    c.dataset.mean = IMAGENET_MEAN  # input normalisation, after scaling pixels to [0, 1]
    c.dataset.std = IMAGENET_STD

    c.model = ml_collections.ConfigDict()
    c.model.variant = "tiny"  # tiny | small | base, the reference's vit_tiny/small/base
    c.model.patch_size = 16
    c.model.embed_dim = 0  # 0 = the variant's; set with depth/num_heads for a custom size
    c.model.depth = 0
    c.model.num_heads = 0
    c.model.drop_path_rate = 0.1  # student only; the teacher never drops paths
    # Compute dtype; parameters stay float32. auto: resolved once at the start by dino_jax/precision.py
    # (bfloat16 on TPUs and GPUs of compute capability >= 8.0, float16 with loss scaling on 7.x,
    # float32 on the CPU; a resumed run keeps the dtype its config.json records) | float32 |
    # bfloat16 | float16 (with loss scaling)
    c.model.dtype = "auto"
    # True: the blocks run as a lax.scan over their stacked parameters. Compiles several times
    # faster (one block in the program instead of `depth`), but on a GPU the loop's buffer copies
    # launch more kernels and move more bytes per step (docs/benchmarks.md), so False by default.
    # Parameters, checkpoints and results are the same either way.
    c.model.scan_blocks = False
    # True: on one GPU in 16 bits, each block runs as Pallas (Triton) kernels that fold its norms,
    # stochastic depth and residual adds into the products around them and keep the MLP's hidden
    # layer on chip (dino_jax/models/fused_*.py): compiled for an H100, the CIFAR-100 step moves
    # 29.8 GB instead of 58.0 (docs/benchmarks.md). False by default until it has been timed on a
    # GPU; other devices, float32, multi-device runs and GPUs older than Ampere (XLA runs Triton on
    # compute capability 8.0 and up; the run says so) ignore it. Parameters and checkpoints are the
    # same either way.
    c.model.pallas_kernels = False

    c.head = ml_collections.ConfigDict()
    c.head.out_dim = 65536
    c.head.hidden_dim = 2048
    c.head.bottleneck_dim = 256
    c.head.nlayers = 3
    c.head.use_bn = False
    c.head.norm_last_layer = True

    c.augment = ml_collections.ConfigDict()
    c.augment.on = "host"  # host (grain workers, numpy) | device (jitted ops inside the step)
    c.augment.global_crop_size = 224
    c.augment.local_crop_size = 96
    c.augment.num_local_crops = 8
    c.augment.global_crop_scale = (0.4, 1.0)
    c.augment.local_crop_scale = (0.05, 0.4)
    c.augment.crop_aspect_ratio = (3 / 4, 4 / 3)  # RandomResizedCrop's range of width / height
    c.augment.flip_p = 0.5
    c.augment.color_jitter_p = 0.8
    c.augment.brightness = 0.4
    c.augment.contrast = 0.4
    c.augment.saturation = 0.2
    c.augment.hue = 0.1
    c.augment.grayscale_p = 0.2
    c.augment.blur_p = (1.0, 0.1, 0.5)  # global 1, global 2, each local crop
    c.augment.blur_sigma = (0.1, 2.0)  # Gaussian blur radius range, in pixels of the output crop
    c.augment.solarize_p = 0.2  # second global crop only
    c.augment.num_workers = 0  # grain worker processes for the host path (0 = in-process)

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 256  # global: distinct images per step, over all devices
    c.train.epochs = 100
    c.train.max_steps = 0  # > 0 stops early (the schedules still span `epochs`)
    c.train.lr = 5e-4  # peak, for a batch of 256; scaled linearly by batch_size / 256
    c.train.min_lr = 1e-6
    c.train.warmup_epochs = 10
    c.train.weight_decay = 0.04
    c.train.weight_decay_end = 0.4
    c.train.clip_grad = 3.0  # per-tensor gradient norm limit; 0 turns it off
    c.train.freeze_last_layer = 1  # epochs
    c.train.momentum_teacher = 0.996
    c.train.warmup_teacher_temp = 0.04
    c.train.teacher_temp = 0.04
    c.train.warmup_teacher_temp_epochs = 0  # the reference's real default (its help text says 30)
    c.train.student_temp = 0.1
    c.train.center_momentum = 0.9
    c.train.log_every_steps = 50
    # Where the metrics of every logged step go, besides the console: "jsonl" (metrics.jsonl, which
    # the run's report reads) and "tensorboard" (event files in the workdir, for
    # `tensorboard --logdir runs/`). () keeps only the console line.
    c.train.log_to = ("jsonl", "tensorboard")
    # Compiled steps are kept here, so a restarted or resumed run (or a second run of the same
    # recipe and shapes) loads its step instead of compiling it again; "" turns this off.
    c.train.compilation_cache_dir = "~/.cache/dino_jax/jax_compilation_cache"
    c.train.checkpoint_every_steps = 1000
    c.train.keep_checkpoints = 2
    # "" or a checkpoint to continue from when the workdir has none of its own: a reference
    # training checkpoint.pth (student, teacher, center, AdamW moments, epoch) or one converted by
    # `--mode=convert`. Its shapes must match this config's model.
    c.train.init_from = ""

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 256  # images per feature-extraction batch, over all devices of all processes
    c.eval.evaluators = ("knn", "linear", "fewshot")  # run at the end of training and by --mode=eval
    c.eval.transfer = ("stl10",)  # datasets evaluated with the frozen backbone (skipped if missing)
    c.eval.transfer_evaluators = ("knn", "linear", "fewshot")
    c.eval.knn_ks = (5, 10, 20, 100, 200)  # a k above the number of training images is left out
    c.eval.knn_temperature = 0.07
    c.eval.random_init_knn = True  # also report the kNN of the untrained network, same run
    c.eval.linear_epochs = 100  # the reference's linear-probe protocol
    c.eval.linear_batch_size = 128
    # Per 256 images, scaled by linear_batch_size / 256. The reference's 0.001 was set for
    # ImageNet's 10,000 steps an epoch; on a small dataset it underfits (sweep it, as the paper did).
    c.eval.linear_base_lr = 0.001
    # Non-empty: a sweep over these base rates in one vmapped run instead of `linear_base_lr`,
    # reporting the rate with the best test top-1 (the test split chooses, as the reference's
    # best-epoch figure does).
    c.eval.linear_base_lrs = ()
    c.eval.linear_n_last_blocks = 4  # "n=4 for ViT-S"; capped at the model's depth
    # True: CLS and the mean patch token of the last block ("True with ViT-Base"); needs
    # linear_n_last_blocks = 1, as in the reference.
    c.eval.linear_avgpool = False
    # True: train the probe on a RandomResizedCrop + flip view of each image per epoch, as the
    # reference does (a backbone pass over the train split every epoch); False: cached features.
    c.eval.linear_augment = False
    c.eval.fewshot_n_way = 0  # classes per episode; 0 = every class of the test split
    c.eval.fewshot_k_shot = 5
    c.eval.fewshot_n_query = 15
    c.eval.fewshot_episodes = 600
    c.eval.fewshot_classifiers = ("ncm", "logreg")  # nearest class mean, logistic regression
    # Logistic regression costs grow as n_way^2 (100-way: minutes per 600 episodes on a CPU); it
    # is skipped for episodes wider than this.
    c.eval.fewshot_logreg_max_way = 20
    # > 0: log a panel of the teacher's attention on fixed test images every N steps; 0: at every
    # point of the kNN monitor (none when it is off).
    c.eval.attention_every_steps = 0
    # The kNN monitor: weighted kNN of the teacher (and with monitor_student the student) on fixed
    # subsets of the train and test splits every N epochs (fractions allowed; 0 = off), and of the
    # untrained network before the first step. Logged like the other metrics, drawn in the report,
    # and read by the collapse warning (kNN falling, or no better than the untrained network's).
    c.eval.monitor_every_epochs = 1.0
    c.eval.monitor_train_images = 10000  # the neighbours (capped at the split's size)
    c.eval.monitor_test_images = 2000  # the queries; also the points of the report's feature map
    c.eval.monitor_knn_k = 20  # with eval.knn_temperature
    c.eval.monitor_student = False
    # Write report.html and its figures into the workdir at the end of training (any run, also one
    # in progress: `launch.py --mode=report --workdir=...`).
    c.eval.report = True
    return c


def shrink_for_smoke_test(c: ml_collections.ConfigDict) -> None:
    """`file.py:smoke`: the same recipe on a 2-block 64-d model for 20 steps, to try a set-up in a
    minute (the crops, data and evaluation stay as the recipe has them)."""
    c.model.embed_dim, c.model.depth, c.model.num_heads = 64, 2, 2
    c.head.out_dim, c.head.hidden_dim = 1024, 256
    c.train.batch_size = 32
    c.train.epochs = 1
    c.train.max_steps = 20
    c.train.warmup_epochs = 0
    c.train.log_every_steps = 5
    c.eval.linear_epochs = 10
    c.eval.fewshot_episodes = 60
    c.eval.monitor_train_images, c.eval.monitor_test_images = 1000, 200
