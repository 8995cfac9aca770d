"""The PyTorch reference's training, end to end, as the baseline of bench/gpu_check.py.

    python -m bench.torch_baseline --config cifar100 --precision amp --batch 256 --json-out r.json

What runs is what the reference's `main_dino.py` runs per iteration: its `DataAugmentationDINO`
(torchvision transforms on PIL images: RandomResizedCrop bicubic, flip, colour jitter, grayscale,
PIL Gaussian blur, solarisation, ToTensor + Normalize) in a `DataLoader` with one worker per host
core, pinned memory and non-blocking copies, then `tests/torch_reference.train_iteration` (teacher
and student forward, DINO loss with centering, backward, per-tensor clipping, AdamW groups, EMA,
center), in float32 or with the reference's fp16 autocast and gradient scaler (`--precision amp`).
The networks and crop sizes are those of our recipe (`configs/<config>.py`); the images are the
same synthetic images our trainer reads with `dataset.synthetic=True`. Where torchvision is not
installed (the CPU test machine: its PyPI build does not load beside the CPU torch there), the
same recipe runs through `dino_jax.data.multicrop.pil_reference` (PIL, one crop at a time, as
torchvision does it) and the output says so.

Figures: end-to-end images/s over the steps after `--warmup` (loader and GPU together, timed on
the host around whole iterations; `train_iteration` ends with `loss.item()`, which waits for the
GPU, as the reference's NaN check does), and the step alone on one batch already on the device.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

import numpy as np

from dino_jax.data import sources


class GaussianBlur:
    """The reference's `utils.GaussianBlur`: PIL's blur with a radius drawn in [0.1, 2] pixels."""

    def __init__(self, p: float, radius_min: float = 0.1, radius_max: float = 2.0):
        self.p, self.radius_min, self.radius_max = p, radius_min, radius_max

    def __call__(self, image):
        from PIL import ImageFilter

        if random.random() > self.p:
            return image
        return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.radius_min, self.radius_max)))


class Solarization:
    """The reference's `utils.Solarization`: PIL's solarize (threshold 128) with probability p."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, image):
        from PIL import ImageOps

        return ImageOps.solarize(image) if random.random() < self.p else image


class DataAugmentationDINO:
    """The reference's multi-crop at our recipe's sizes: [global 1, global 2, local 1..L] tensors."""

    def __init__(self, augment, mean, std):
        from torchvision import transforms

        bicubic = transforms.InterpolationMode.BICUBIC
        flip_and_color_jitter = transforms.Compose(
            [
                transforms.RandomHorizontalFlip(p=augment.flip_p),
                transforms.RandomApply(
                    [
                        transforms.ColorJitter(
                            brightness=augment.brightness,
                            contrast=augment.contrast,
                            saturation=augment.saturation,
                            hue=augment.hue,
                        )
                    ],
                    p=augment.color_jitter_p,
                ),
                transforms.RandomGrayscale(p=augment.grayscale_p),
            ]
        )
        normalize = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
        blur_global1, blur_global2, blur_local = augment.blur_p

        def crop(size, scale, *extra):
            return transforms.Compose(
                [
                    transforms.RandomResizedCrop(size, scale=tuple(scale), interpolation=bicubic),
                    flip_and_color_jitter,
                    *extra,
                    normalize,
                ]
            )

        g, s = augment.global_crop_size, augment.global_crop_scale
        self.global1 = crop(g, s, GaussianBlur(blur_global1))
        self.global2 = crop(g, s, GaussianBlur(blur_global2), Solarization(augment.solarize_p))
        self.local = crop(augment.local_crop_size, augment.local_crop_scale, GaussianBlur(blur_local))
        self.num_local_crops = augment.num_local_crops

    def __call__(self, image):
        crops = [self.global1(image), self.global2(image)]
        crops.extend(self.local(image) for _ in range(self.num_local_crops))
        return crops


class PILMultiCrop:
    """The same recipe without torchvision: `pil_reference.multicrop_pil`, then ToTensor + Normalize."""

    def __init__(self, crop_config, mean, std):
        self.crop_config = crop_config
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)

    def __call__(self, image):
        import torch

        from dino_jax.data.multicrop import pil_reference

        # `random` is seeded per DataLoader worker by torch, as the reference's transforms are.
        globals_, locals_ = pil_reference.multicrop_pil(
            np.asarray(image), random.Random(random.getrandbits(64)), self.crop_config
        )
        crops = list(globals_) + list(locals_)
        return [
            torch.from_numpy(
                ((crop.astype(np.float32) / 255.0 - self.mean) / self.std).transpose(2, 0, 1).copy()
            )
            for crop in crops
        ]


def make_transform(config) -> tuple[object, str]:
    """(multi-crop transform, what implements it): torchvision where installed."""
    from dino_jax import config as config_lib

    mean, std = config.dataset.mean, config.dataset.std
    try:
        import torchvision  # noqa: F401
    except ImportError:
        name = "PIL (dino_jax.data.multicrop.pil_reference)"
        return PILMultiCrop(config_lib.crop_config(config), mean, std), name
    return DataAugmentationDINO(config.augment, mean, std), "torchvision"


class SyntheticImages:
    """A torch-style dataset of `sources.SyntheticSource` images as PIL images, through a transform."""

    def __init__(self, name: str, split: str, transform):
        self.source = sources.synthetic_source(name, split)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        from PIL import Image

        example = self.source[index]
        return self.transform(Image.fromarray(example["image"])), example["label"]


def build_networks(torch, config, weights: dict[str, np.ndarray] | None = None):
    """Student and teacher `MultiCropWrapper`s of the reference (main_dino.py): the teacher never
    drops paths, always normalises its last layer and gets no gradient. Both start from `weights`
    (a `torch_convert.dino_to_torch` state dict) where given; otherwise the student keeps the
    reference's own initialisation and the teacher starts as a copy of it."""
    from dino_jax import config as config_lib
    from dino_jax import precision
    from tests import torch_reference as ref

    # Only the sizes are read here; the PyTorch step's precision is `run`'s (autocast or not).
    config = precision.with_dtype(config, "float32")
    vit_config = config_lib.vit_config(config, drop_path=True)
    head_config = config_lib.head_config(config, vit_config.embed_dim)

    def network(drop_path_rate, norm_last_layer):
        backbone = ref.VisionTransformer(
            img_size=vit_config.image_size,
            patch_size=vit_config.patch_size,
            embed_dim=vit_config.embed_dim,
            depth=vit_config.depth,
            num_heads=vit_config.num_heads,
            mlp_ratio=vit_config.mlp_ratio,
            qkv_bias=vit_config.qkv_bias,
            drop_path_rate=drop_path_rate,
            eps=vit_config.layer_norm_eps,
        )
        head = ref.DINOHead(
            head_config.in_dim,
            head_config.out_dim,
            use_bn=head_config.use_bn,
            norm_last_layer=norm_last_layer,
            nlayers=head_config.nlayers,
            hidden_dim=head_config.hidden_dim,
            bottleneck_dim=head_config.bottleneck_dim,
        )
        return ref.MultiCropWrapper(backbone, head)

    student = network(vit_config.drop_path_rate, head_config.norm_last_layer)
    teacher = network(0.0, True)
    if weights is None:
        teacher.load_state_dict(student.state_dict())
    else:
        tensors = {key: torch.tensor(value) for key, value in weights.items()}
        for net in (student, teacher):
            net.load_state_dict(tensors, strict=True)
    for param in teacher.parameters():
        param.requires_grad = False
    return student, teacher


def build_loss_and_schedules(ref, config, plan) -> tuple[object, dict[str, np.ndarray]]:
    """The reference's `DINOLoss` and its per-iteration lr / weight-decay / teacher-momentum
    schedules (the `train_iteration` keyword arguments), for `config` and its step plan."""
    t = config.train
    dino_loss = ref.DINOLoss(
        config.head.out_dim,
        2 + config.augment.num_local_crops,
        t.warmup_teacher_temp,
        t.teacher_temp,
        t.warmup_teacher_temp_epochs,
        t.epochs,
        student_temp=t.student_temp,
        center_momentum=t.center_momentum,
    )
    spe = plan.steps_per_epoch
    schedules = {
        "lr_schedule": ref.cosine_scheduler(plan.peak_lr, t.min_lr, t.epochs, spe, t.warmup_epochs),
        "wd_schedule": ref.cosine_scheduler(t.weight_decay, t.weight_decay_end, t.epochs, spe),
        "momentum_schedule": ref.cosine_scheduler(t.momentum_teacher, 1.0, t.epochs, spe),
    }
    return dino_loss, schedules


def run(config, *, precision: str, warmup: int, steps: int, step_only_steps: int, num_workers: int) -> dict:
    import torch

    from dino_jax import config as config_lib
    from tests import torch_reference as ref

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True  # the reference's main_dino.py sets it
    batch = config.train.batch_size
    spec = sources.DATASETS[config.dataset.name]
    plan = config_lib.plan_steps(config, spec.num_train)
    student, teacher = (net.to(device) for net in build_networks(torch, config))
    optimizer = torch.optim.AdamW(ref.get_params_groups(student))
    dino_loss, schedules = build_loss_and_schedules(ref, config, plan)
    dino_loss = dino_loss.to(device)
    t, spe = config.train, plan.steps_per_epoch
    scaler = torch.amp.GradScaler(device.type) if precision == "amp" else None
    transform, transform_name = make_transform(config)
    loader = torch.utils.data.DataLoader(
        SyntheticImages(config.dataset.name, spec.train_split, transform),
        batch_size=batch,
        shuffle=True,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        drop_last=True,
    )

    def iteration(crops, it):
        return ref.train_iteration(
            student,
            teacher,
            dino_loss,
            optimizer,
            crops,
            it=it,
            epoch=it // spe,
            clip_grad=t.clip_grad,
            freeze_last_layer=t.freeze_last_layer,
            fp16_scaler=scaler,
            **schedules,
        )

    started = time.perf_counter()
    step_times, losses, last, device_crops = [], [], None, None
    for it, (crops, _) in enumerate(loader):
        if it == warmup + steps:
            break
        device_crops = [crop.to(device, non_blocking=True) for crop in crops]
        losses.append(iteration(device_crops, it))
        now = time.perf_counter()
        if last is not None:
            step_times.append(now - last)
        last = now
    first_steps_s = time.perf_counter() - started - sum(step_times[warmup - 1 :])
    steady = step_times[warmup - 1 :]
    # The step alone: one batch already on the device, so the loader is out of the picture (its
    # workers stopped with the loop's iterator).
    step_only_started = time.perf_counter()
    for offset in range(step_only_steps):
        iteration(device_crops, warmup + steps + offset)
    step_only_s = (time.perf_counter() - step_only_started) / max(step_only_steps, 1)
    return {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "torch_version": torch.__version__,
        "precision": precision,
        "batch": batch,
        "loader_workers": num_workers,
        "augmentation": transform_name,
        "warmup_steps": warmup,
        "steps": len(steady),
        "first_steps_s": round(first_steps_s, 3),
        "step_s": round(sum(steady) / len(steady), 5),
        "images_per_s": round(batch * len(steady) / sum(steady), 1),
        "step_only_s": round(step_only_s, 5),
        "step_only_images_per_s": round(batch / step_only_s, 1),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3)
        if device.type == "cuda"
        else None,
        "loss_finite": bool(np.all(np.isfinite(losses))),
        "full_run_steps": plan.train_steps,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=("cifar100", "tiny_imagenet"), default="cifar100")
    parser.add_argument("--precision", choices=("fp32", "amp"), default="amp")
    parser.add_argument("--batch", type=int, default=0, help="0: the recipe's")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--step-only-steps", type=int, default=10)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (0: one per host core)")
    parser.add_argument("--smoke", action="store_true", help="the recipe's :smoke shrink (tiny model)")
    parser.add_argument("--json-out", help="also write the figures here")
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1")

    from bench import gpu_check

    config = gpu_check.recipe(args.config, smoke=args.smoke, batch=args.batch)
    figures = run(
        config,
        precision=args.precision,
        warmup=args.warmup,
        steps=args.steps,
        step_only_steps=args.step_only_steps,
        num_workers=args.workers or len(os.sched_getaffinity(0)),
    )
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(figures, f)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
