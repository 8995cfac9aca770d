"""Benchmark of multi-crop augmentation: our host path and device path against PIL.

    python -m bench.augment            # ~1 minute on a 2-core CPU
    python -m bench.augment --quick    # a smoke run, seconds

Both resolutions of issue 3: 32 px images with 2x32 + 8x16 crops, 64 px images with 2x64 + 8x32
crops, the reference's probabilities and scales. Inputs are smoothed random colour images.

- `pil`: the reference recipe written with PIL, one crop at a time as torchvision runs it
  (`dino_jax.data.multicrop.pil_reference.multicrop_pil`), ending at uint8 crops.
- `pil_normalized`: the same, plus what the reference does next to every crop: ToTensor
  (float32, CHW, /255) and Normalize(ImageNet mean/std). Our paths leave normalisation to the
  accelerator (uint8 batches travel 4x lighter), so this is the reference's full host cost.
- `host`: `multicrop.host.multicrop_batch` on batches of 64 images, each with its own generator, as the
  grain pipeline calls it.
- `device_cpu`: `multicrop.device.multicrop_batch` jitted on the CPU backend, batch 256 (a GPU or
  TPU would run the same program; there is none on the machine this was written on).

Every number is images per second on ONE core: BLAS and XLA are pinned to one thread, and each
path runs in this process for the same wall-clock budget, side by side, so the ratios hold even
on a busy machine. The last line is one JSON object: `*_per_s` throughputs and `*_speedup`
ratios (host / PIL).
"""

from __future__ import annotations

import os

# One core per measurement: set before numpy / jax load their thread pools.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
)

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image, ImageFilter  # noqa: E402

from dino_jax import config as config_lib  # noqa: E402
from dino_jax.configs import base  # noqa: E402
from dino_jax.data import normalize  # noqa: E402
from dino_jax.data.multicrop import host, pil_reference  # noqa: E402

SETTINGS = {32: (32, 16), 64: (64, 32)}  # image size -> (global crop, local crop)
_ROUNDS = 6  # Interleaved rounds per path and size, sharing the time budget.


def _images(count, size):
    rs = np.random.RandomState(0)
    return np.stack(
        [
            np.asarray(
                Image.fromarray(rs.randint(0, 256, (size, size, 3)).astype(np.uint8)).filter(
                    ImageFilter.SMOOTH_MORE
                )
            )
            for _ in range(count)
        ]
    )


def _rate(step, images_per_step, budget_s):
    """Images per second of `step`, after one warm-up call, over about `budget_s` seconds."""
    step()
    start = time.perf_counter()
    done = 0
    while time.perf_counter() - start < budget_s:
        step()
        done += images_per_step
    return done / (time.perf_counter() - start)


def _pil_normalized(image, rng, config):
    mean = np.asarray(normalize.IMAGENET_MEAN, np.float32)[:, None, None]
    std = np.asarray(normalize.IMAGENET_STD, np.float32)[:, None, None]
    global_crops, local_crops = pil_reference.multicrop_pil(image, rng, config)
    return [
        (crop.transpose(2, 0, 1).astype(np.float32) / 255.0 - mean) / std
        for crop in list(global_crops) + list(local_crops)
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short budgets (smoke run)")
    parser.add_argument("--skip-device", action="store_true", help="skip the JAX device path")
    args = parser.parse_args()
    budget = 1.0 if args.quick else 6.0

    results = {}
    for size, (global_size, local_size) in SETTINGS.items():
        recipe = base.get_config()
        recipe.augment.global_crop_size, recipe.augment.local_crop_size = global_size, local_size
        config = config_lib.crop_config(recipe)
        images = _images(64, size)
        py_rng = random.Random(0)
        counter = iter(range(1 << 62))

        def pil_step():
            pil_reference.multicrop_pil(images[next(counter) % 64], py_rng, config)

        def pil_normalized_step():
            _pil_normalized(images[next(counter) % 64], py_rng, config)

        def host_step():
            rngs = [np.random.default_rng(next(counter)) for _ in range(64)]
            host.multicrop_batch(images, rngs, config)

        # Interleave the paths in short rounds so a change in machine load hits them alike.
        rates = {"pil": [], "pil_normalized": [], "host": []}
        for _ in range(_ROUNDS):
            rates["pil"].append(_rate(pil_step, 1, budget / _ROUNDS))
            rates["pil_normalized"].append(_rate(pil_normalized_step, 1, budget / _ROUNDS))
            rates["host"].append(_rate(host_step, 64, budget / _ROUNDS))
        for name, values in rates.items():
            results[f"{name}_{size}px_per_s"] = round(float(np.mean(values)), 1)
        results[f"host_vs_pil_{size}px_speedup"] = round(
            results[f"host_{size}px_per_s"] / results[f"pil_{size}px_per_s"], 2
        )
        results[f"host_vs_pil_normalized_{size}px_speedup"] = round(
            results[f"host_{size}px_per_s"] / results[f"pil_normalized_{size}px_per_s"], 2
        )

        if not args.skip_device:
            import jax
            import jax.numpy as jnp
            from dino_jax.data.multicrop import device

            device_batch = 256
            step_fn = jax.jit(device.multicrop_batch, static_argnums=2)
            device_images = jnp.asarray(np.resize(images, (device_batch, size, size, 3)))
            keys = iter(jax.random.split(jax.random.key(0), 100000))

            def device_step():
                global_crops, local_crops = step_fn(device_images, next(keys), config)
                local_crops.block_until_ready()

            results[f"device_cpu_{size}px_per_s"] = round(_rate(device_step, device_batch, budget), 1)
            results["device_backend"] = jax.default_backend()
        print(
            f"{size} px: " + ", ".join(f"{k}={v}" for k, v in results.items() if f"_{size}px_" in k),
            flush=True,
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
