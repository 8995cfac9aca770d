"""Pixel normalisation shared by training, evaluation and the interop tests.

Batches travel to the accelerator as uint8 (4x less host->device traffic than float32); this is
the one place that turns them into the float inputs the network sees.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

# torchvision's ImageNet statistics, as the reference's `Normalize` uses them after `ToTensor`; the
# config's defaults (`dataset.mean`/`std`) and the statistics of imported PyTorch checkpoints.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_images(
    images_uint8, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
):
    """Returns float32 `(images / 255 - mean) / std`, channels last.

    Works on numpy arrays (returns numpy, for host code) and on jax arrays or tracers (returns jax,
    for use inside jit). `mean` and `std` have one entry per channel, or a single entry.
    """
    mean_np = np.asarray(mean, np.float32).reshape(-1)
    std_np = np.asarray(std, np.float32).reshape(-1)
    channels = images_uint8.shape[-1]
    for stat_name, stat in (("mean", mean_np), ("std", std_np)):
        if stat.size not in (1, channels):
            raise ValueError(
                f"normalize_images: {stat_name} has {stat.size} entries; expected 1 or one per channel "
                f"({channels}) for images of shape {tuple(images_uint8.shape)}"
            )
    if np.any(std_np == 0):
        raise ValueError(f"normalize_images: std {tuple(std_np)} contains 0; expected all > 0")
    # Folding 1/255 into scale and offset gives one multiply-add per pixel.
    scale = 1.0 / (255.0 * std_np)
    offset = -mean_np / std_np
    if isinstance(images_uint8, np.ndarray):
        return images_uint8.astype(np.float32) * scale + offset
    return jnp.asarray(images_uint8).astype(jnp.float32) * scale + offset
