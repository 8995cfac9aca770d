"""The multi-crop recipe both paths follow: its config and the table of random draws.

DINO's multi-crop (the reference's `DataAugmentationDINO`), per crop in its order:
RandomResizedCrop (bicubic) -> horizontal flip -> colour jitter (brightness, contrast, saturation,
hue in random order; p=0.8) -> grayscale (p=0.2) -> Gaussian blur -> solarisation.

Every random number a crop needs is one entry of a row of `NUM_UNIFORMS` uniforms in [0, 1): the
host path (`host.py`, numpy) and the device path (`device.py`, jitted JAX) read the same entries
the same way (`crop_boxes`, `crop_draws`, written once over an array module `xp`), so given the
same uniforms they make the same decisions, and their statistics agree by construction.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import numpy as np

# Colour-jitter operations, in torchvision's parameter order.
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)

# The table of random draws: what each entry of a crop's row of uniforms decides.
ATTEMPTS = 10  # torchvision's RandomResizedCrop tries this many boxes before falling back.
AREA = slice(0, ATTEMPTS)  # Area fraction of each attempt, uniform in the crop scale.
LOG_RATIO = slice(ATTEMPTS, 2 * ATTEMPTS)  # Log aspect ratio of each attempt.
TOP, LEFT = 20, 21  # Offset of the kept box.
FLIP, JITTER = 22, 23  # Whether to flip; whether to jitter the colours.
ORDER_KEYS = slice(24, 28)  # Sort keys: their argsort is the order of the 4 jitter ops.
FACTORS = slice(28, 32)  # Brightness, contrast, saturation factors and hue shift, by op.
GRAY, BLUR, SIGMA, SOLARIZE = 32, 33, 34, 35  # Grayscale; blur and its sigma; solarisation.
NUM_UNIFORMS = 36


def _check_range(name, value, low, high):
    if not (len(value) == 2 and low <= value[0] <= value[1] <= high):
        raise ValueError(
            f"MultiCropConfig.{name}={value}: expected (min, max) with {low} <= min <= max <= {high}"
        )


def _check_probability(name, value):
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"MultiCropConfig.{name}={value}: expected a probability in [0, 1]")


@dataclasses.dataclass(frozen=True)
class MultiCropConfig:
    """The multi-crop recipe; `dino_jax.config.crop_config` builds it from `config.augment`,
    whose defaults (`dino_jax/configs/base.py`) are the reference's except the crop sizes.

    Per-crop tuples (`blur_p`, `solarize_p`) are (global crop 1, global crop 2, local crops).
    Colour-jitter strengths follow torchvision: brightness b draws a factor in [max(0, 1-b), 1+b],
    hue h draws a shift in [-h, h] of a full turn.
    """

    global_size: int
    local_size: int
    num_local_crops: int
    global_scale: tuple[float, float]
    local_scale: tuple[float, float]
    flip_p: float
    color_jitter_p: float
    brightness: float
    contrast: float
    saturation: float
    hue: float
    grayscale_p: float
    blur_p: tuple[float, float, float]
    blur_sigma: tuple[float, float]
    solarize_p: tuple[float, float, float]
    aspect_ratio: tuple[float, float]

    def __post_init__(self):
        for name in ("global_size", "local_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"MultiCropConfig.{name}={getattr(self, name)}: expected >= 1 pixel")
        if self.num_local_crops < 0:
            raise ValueError(f"MultiCropConfig.num_local_crops={self.num_local_crops}: expected >= 0")
        _check_range("global_scale", self.global_scale, 1e-6, 1.0)
        _check_range("local_scale", self.local_scale, 1e-6, 1.0)
        _check_range("aspect_ratio", self.aspect_ratio, 1e-6, math.inf)
        _check_range("blur_sigma", self.blur_sigma, 1e-6, math.inf)
        for name in ("flip_p", "color_jitter_p", "grayscale_p"):
            _check_probability(name, getattr(self, name))
        for name in ("blur_p", "solarize_p"):
            value = getattr(self, name)
            if len(value) != 3:
                raise ValueError(
                    f"MultiCropConfig.{name}={value}: expected 3 probabilities (global 1, global 2, local)"
                )
            for p in value:
                _check_probability(name, p)
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ValueError(f"MultiCropConfig.{name}={getattr(self, name)}: expected >= 0")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"MultiCropConfig.hue={self.hue}: expected a value in [0, 0.5]")

    def jitter_ranges(self) -> np.ndarray:
        """(4, 2) factor ranges for brightness, contrast, saturation (multiplicative) and hue (shift)."""
        return np.array(
            [
                [max(0.0, 1 - self.brightness), 1 + self.brightness],
                [max(0.0, 1 - self.contrast), 1 + self.contrast],
                [max(0.0, 1 - self.saturation), 1 + self.saturation],
                [-self.hue, self.hue],
            ],
            np.float64,
        )


class CropGroup(NamedTuple):
    """The crops of one resolution: views `views` of an image's rows of uniforms, `size` pixels
    square, areas in `scale`; `blur_p` and `solarize_p` (one per view) are numpy float64."""

    views: slice
    size: int
    scale: tuple[float, float]
    blur_p: np.ndarray
    solarize_p: np.ndarray


def crop_groups(config: MultiCropConfig) -> tuple[CropGroup, CropGroup]:
    """(global crops, local crops): an image's rows of uniforms are [global 1, global 2, locals]."""
    local = config.num_local_crops
    return (
        CropGroup(
            slice(0, 2),
            config.global_size,
            config.global_scale,
            np.array(config.blur_p[:2]),
            np.array(config.solarize_p[:2]),
        ),
        CropGroup(
            slice(2, 2 + local),
            config.local_size,
            config.local_scale,
            np.full(local, config.blur_p[2]),
            np.full(local, config.solarize_p[2]),
        ),
    )


def uniforms_shape(batch: int, config: MultiCropConfig) -> tuple[int, int, int]:
    """Shape of a batch's uniforms: one row per crop of each image, globals first."""
    return (batch, 2 + config.num_local_crops, NUM_UNIFORMS)


def crop_boxes(uniforms, height: int, width: int, scale, ratio, xp: Any = np):
    """RandomResizedCrop boxes from uniforms `(n, NUM_UNIFORMS)`: int `(n, 4)` (top, left, h, w).

    torchvision's sampler, vectorised over crops: up to `ATTEMPTS` draws of an area fraction
    uniform in `scale` and a log-uniform aspect ratio in `ratio`; the first box that fits is kept;
    if none fits, the centre crop of the largest box whose aspect ratio is inside `ratio`. `xp` is
    numpy (int64 boxes) or jax.numpy (int32, JAX's default integer; traceable).
    """
    int_dtype = np.int64 if xp is np else xp.int32
    target_area = height * width * (scale[0] + (scale[1] - scale[0]) * uniforms[:, AREA])
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    aspect = xp.exp(log_low + (log_high - log_low) * uniforms[:, LOG_RATIO])
    # rint rounds half to even, like Python's round() in torchvision.
    crop_w = xp.rint(xp.sqrt(target_area * aspect)).astype(int_dtype)
    crop_h = xp.rint(xp.sqrt(target_area / aspect)).astype(int_dtype)
    fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
    first = xp.argmax(fits, axis=1)[:, None]
    found = xp.take_along_axis(fits, first, axis=1)[:, 0]
    crop_h = xp.take_along_axis(crop_h, first, axis=1)[:, 0]
    crop_w = xp.take_along_axis(crop_w, first, axis=1)[:, 0]
    # torch.randint(0, n + 1) is uniform on {0, ..., n}.
    top = xp.floor(uniforms[:, TOP] * (height - crop_h + 1)).astype(int_dtype)
    left = xp.floor(uniforms[:, LEFT] * (width - crop_w + 1)).astype(int_dtype)
    in_ratio = width / height
    if in_ratio < min(ratio):
        fallback_w, fallback_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fallback_w, fallback_h = int(round(height * max(ratio))), height
    else:
        fallback_w, fallback_h = width, height
    crop_h = xp.where(found, crop_h, fallback_h)
    crop_w = xp.where(found, crop_w, fallback_w)
    top = xp.where(found, top, (height - fallback_h) // 2)
    left = xp.where(found, left, (width - fallback_w) // 2)
    return xp.stack([top, left, crop_h, crop_w], axis=1)


class CropDraws(NamedTuple):
    """Every crop's random decisions and parameters, one entry per row of uniforms."""

    boxes: Any  # int (n, 4): top, left, height, width.
    flip: Any  # bool (n,)
    jitter: Any  # bool (n,): colour jitter on.
    order: Any  # int (n, 4): the jitter ops (BRIGHTNESS, ...) in the order they run.
    factors: Any  # float (n, 4): brightness, contrast, saturation factors and hue shift, by op.
    gray: Any  # bool (n,)
    blur: Any  # bool (n,)
    sigma: Any  # float (n,): the blur's sigma in crop pixels.
    solarize: Any  # bool (n,)


def crop_draws(
    uniforms_BxVxU,
    config: MultiCropConfig,
    group: CropGroup,
    height: int,
    width: int,
    xp: Any = np,
    dtype=np.float64,
) -> CropDraws:
    """Reads the uniforms of B images' V views of `group` into draws of B * V crops, image-major.

    `xp` is numpy or jax.numpy; `dtype` the float type of the parameters the uniforms are scaled
    by and compared with: float64 on the host, float32 on the device.
    """
    batch, num_views = uniforms_BxVxU.shape[:2]
    u = uniforms_BxVxU.reshape(batch * num_views, NUM_UNIFORMS)
    ranges = xp.asarray(config.jitter_ranges(), dtype)
    low, high = config.blur_sigma
    return CropDraws(
        boxes=crop_boxes(u, height, width, group.scale, config.aspect_ratio, xp),
        flip=u[:, FLIP] < config.flip_p,
        jitter=u[:, JITTER] < config.color_jitter_p,
        order=xp.argsort(u[:, ORDER_KEYS], axis=1),  # A uniform random permutation of the 4 ops.
        factors=ranges[:, 0] + (ranges[:, 1] - ranges[:, 0]) * u[:, FACTORS],
        gray=u[:, GRAY] < config.grayscale_p,
        # The reference blurs when random() <= p and solarises when random() < p.
        blur=u[:, BLUR] <= xp.tile(xp.asarray(group.blur_p, dtype), batch),
        sigma=low + (high - low) * u[:, SIGMA],
        solarize=u[:, SOLARIZE] < xp.tile(xp.asarray(group.solarize_p, dtype), batch),
    )
