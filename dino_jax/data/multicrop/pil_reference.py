"""The reference multi-crop recipe written with PIL, one crop at a time, as torchvision runs it.

Not used for training. It is the yardstick: tests compare the kernels (`resize.py`, `color.py`,
`box_blur.py`), `host.py` and `device.py` with it op by op, and `bench/augment.py` times our paths
against it. Each op takes its random parameters as arguments, so a test can fix them;
`multicrop_pil` draws them the way the reference does (torchvision's sampling, Python's `random`
for blur and solarisation).
"""

from __future__ import annotations

import math
import random

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from dino_jax.data.multicrop.spec import BRIGHTNESS, CONTRAST, HUE, SATURATION, MultiCropConfig


def random_resized_crop_params(
    rng: random.Random, height: int, width: int, scale, ratio
) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params: (top, left, height, width)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(img: Image.Image, box, size: int) -> Image.Image:
    top, left, height, width = box
    return img.crop((left, top, left + width, top + height)).resize((size, size), Image.BICUBIC)


def adjust_hue(img: Image.Image, shift: float) -> Image.Image:
    """torchvision's PIL hue adjustment: shift the 8-bit H channel with uint8 wrap-around."""
    hue, sat, val = img.convert("HSV").split()
    hue_np = np.array(hue, dtype=np.uint8)
    with np.errstate(over="ignore"):
        hue_np += np.array(shift * 255).astype(np.int64).astype(np.uint8)
    return Image.merge("HSV", (Image.fromarray(hue_np, "L"), sat, val)).convert("RGB")


def color_jitter(img: Image.Image, order, factors) -> Image.Image:
    """torchvision ColorJitter with the given op order and factors (indexed by op)."""
    for op in order:
        if op == BRIGHTNESS:
            img = ImageEnhance.Brightness(img).enhance(factors[BRIGHTNESS])
        elif op == CONTRAST:
            img = ImageEnhance.Contrast(img).enhance(factors[CONTRAST])
        elif op == SATURATION:
            img = ImageEnhance.Color(img).enhance(factors[SATURATION])
        elif op == HUE:
            img = adjust_hue(img, factors[HUE])
    return img


def grayscale(img: Image.Image) -> Image.Image:
    return img.convert("L").convert("RGB")


def gaussian_blur(img: Image.Image, sigma: float) -> Image.Image:
    return img.filter(ImageFilter.GaussianBlur(radius=float(sigma)))


def solarize(img: Image.Image) -> Image.Image:
    return ImageOps.solarize(img, threshold=128)


def _crop(
    img: Image.Image,
    rng: random.Random,
    config: MultiCropConfig,
    size: int,
    scale,
    blur_p: float,
    solarize_p: float,
) -> np.ndarray:
    box = random_resized_crop_params(rng, img.height, img.width, scale, config.aspect_ratio)
    out = resized_crop(img, box, size)
    if rng.random() < config.flip_p:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    if rng.random() < config.color_jitter_p:
        order = list(range(4))
        rng.shuffle(order)
        ranges = config.jitter_ranges()
        factors = [rng.uniform(low, high) for low, high in ranges]
        out = color_jitter(out, order, factors)
    if rng.random() < config.grayscale_p:
        out = grayscale(out)
    if rng.random() <= blur_p:
        out = gaussian_blur(out, rng.uniform(*config.blur_sigma))
    if rng.random() < solarize_p:
        out = solarize(out)
    return np.asarray(out)


def multicrop_pil(
    image: np.ndarray, rng: random.Random, config: MultiCropConfig
) -> tuple[np.ndarray, np.ndarray]:
    """The reference recipe with PIL: (globals uint8 (2,G,G,3), locals uint8 (L,l,l,3))."""
    img = Image.fromarray(image)
    globals_ = [
        _crop(
            img, rng, config, config.global_size, config.global_scale, config.blur_p[i], config.solarize_p[i]
        )
        for i in range(2)
    ]
    locals_ = [
        _crop(img, rng, config, config.local_size, config.local_scale, config.blur_p[2], config.solarize_p[2])
        for _ in range(config.num_local_crops)
    ]
    local_array = (
        np.stack(locals_) if locals_ else np.zeros((0, config.local_size, config.local_size, 3), np.uint8)
    )
    return np.stack(globals_), local_array
