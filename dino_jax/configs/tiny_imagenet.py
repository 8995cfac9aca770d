"""DINO ViT-Tiny/8 on Tiny-ImageNet-200, one GPU.

    python launch.py --config=configs/tiny_imagenet.py --workdir=runs/tiny_imagenet
    python launch.py --config=configs/tiny_imagenet.py:smoke --workdir=/tmp/smoke   # to try
    dino-jax --config=tiny_imagenet --workdir=runs/tiny_imagenet   # installed (pip install .), from any directory

Data: our TFDS builder over the official tiny-imagenet-200.zip (dino_jax/data/tiny_imagenet.py).
It is downloaded (and its md5 checked) on first use where there is internet; offline, put the zip
at <data_dir>/downloads/manual/tiny-imagenet-200.zip and the first run builds the dataset from it.
No result has been measured with this recipe yet: nothing here is a promise of accuracy.
"""

from dino_jax.configs import base


def get_config(arg=None):
    args = base.parse_arg(arg)
    c = base.get_config()
    c.dataset.name = "tiny_imagenet"

    # 64 px images: patch 8 gives an 8x8 grid (64 tokens), the same token count as CIFAR-100 at
    # patch 4, so the compute per image matches the CIFAR recipe.
    c.model.variant = "tiny"
    c.model.patch_size = 8
    c.model.drop_path_rate = 0.1  # reference default

    c.head.out_dim = 65536  # reference; lower it (8192) if the loss sits at ln(K) on a short run
    c.head.norm_last_layer = True

    # Global crops at the native 64 px, local crops at 32 px (the reference's 96/224 ~ 0.43 of the
    # global size, rounded to a multiple of the patch size).
    c.augment.on = "device"  # 64 px images: the accelerator does the crops, the host only reads
    c.augment.global_crop_size = 64
    c.augment.local_crop_size = 32
    c.augment.num_local_crops = 8

    # 100,000 images, batch 256 with the reference's linear lr scaling: 390 steps per epoch;
    # 100 epochs = 39,000 steps, the same step count as configs/cifar100.py.
    c.train.batch_size = 256
    c.train.epochs = 100
    c.train.warmup_epochs = 10
    c.train.momentum_teacher = 0.996
    c.train.checkpoint_every_steps = 2000
    c.train.log_every_steps = 100

    c.eval.batch_size = 512

    if args.get("smoke"):
        base.shrink_for_smoke_test(c)
    return c
