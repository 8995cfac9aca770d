"""PIL's colour operations of the multi-crop recipe, in numpy, on float32 crops laid out (N, 3, H, W)
that hold whole numbers, mostly in place: ColorJitter, grayscale, solarize.

Where PIL's integer arithmetic shapes the result, it is reproduced:
- Brightness, contrast and saturation are PIL blends with a degenerate image (black, the rounded
  mean luma, the luma image), truncated to 8 bits like `Image.blend`.
- Grayscale and every luma use PIL's fixed-point ITU-R 601 weights (19595, 38470, 7471)/65536.
Where it does not, it is a float operation on purpose:
- Hue is rotated in float HSV (as torchvision does for tensors). PIL's own path stores hue in 8
  bits, a 1.4 degree step, and so perturbs every jittered pixel by up to a few levels; that noise
  is an artefact of PIL, not part of the recipe.

The device path (`device.py`) writes the same operations as shape-static JAX ops.
"""

from __future__ import annotations

import numpy as np

from dino_jax.data.multicrop.spec import BRIGHTNESS, CONTRAST, HUE

# PIL's fixed-point ITU-R 601-2 luma weights ("L" conversion), scaled by 2^-16. The weighted sum
# of 8-bit values then needs at most 24 bits: float32 holds it exactly in any summation order, and
# floor(sum + 0.5) is PIL's (sum * 65536 + 32768) >> 16.
_LUMA_WEIGHTS = np.array([19595.0, 38470.0, 7471.0], np.float32) / 65536.0
_HUE_CENTRES = np.array([0.0, 2.0, 4.0], np.float32)[None, :, None, None]  # R, G, B in sixths.

# numpy's `where` on a mask that changes from pixel to pixel runs ~8x slower than arithmetic
# (a branch per element), so per-pixel choices below are made with 0/1 masks, which is exact:
# 1 * v == v and 0 * v == 0 for every finite v.


def luma(x_Nx3xHxW: np.ndarray) -> np.ndarray:
    """PIL's "L" conversion of integer-valued RGB: (N, H, W) float32 integers in [0, 255]."""
    weighted = np.einsum("nchw,c->nhw", x_Nx3xHxW, _LUMA_WEIGHTS)
    weighted += 0.5
    return np.floor(weighted, out=weighted)


def _blend(x, degenerate, factor):
    """In place: PIL's `Image.blend(degenerate, x, factor)` = truncate(d + factor * (x - d)).

    The arithmetic keeps PIL's form so the truncation lands on the same integers.
    """
    np.subtract(x, degenerate, out=x)
    np.multiply(x, factor, out=x)
    np.add(x, degenerate, out=x)
    np.clip(x, 0.0, 255.0, out=x)
    np.floor(x, out=x)


def _adjust_brightness(x, factor):
    # The blend with a black image: 0 + factor * (x - 0), never below 0.
    np.multiply(x, factor, out=x)
    np.clip(x, 0.0, 255.0, out=x)  # Faster than np.minimum with a scalar.
    np.floor(x, out=x)


def _adjust_contrast(x, factor):
    # PIL blends with a flat image at the rounded mean luma.
    # The sum of the luma values is exact in float32 (below 2^24), so this is their mean.
    gray_sum = np.add.reduce(luma(x).reshape(len(x), -1), axis=1)
    mean_gray = np.floor(gray_sum / (x.shape[2] * x.shape[3]) + 0.5)
    _blend(x, mean_gray[:, None, None, None], factor)


def _adjust_saturation(x, factor):
    _blend(x, luma(x)[:, None], factor)


def _rotate_hue(x_Nx3xHxW: np.ndarray, shift: np.ndarray) -> None:
    """In place: rotates hue by `shift` (N,) turns (|shift| <= 0.5) in float HSV; value and
    saturation kept. `x` holds integers."""
    red, green, blue = x_Nx3xHxW[:, 0], x_Nx3xHxW[:, 1], x_Nx3xHxW[:, 2]
    maxc = x_Nx3xHxW.max(axis=1)
    chroma = x_Nx3xHxW.min(axis=1)
    np.subtract(maxc, chroma, out=chroma)
    # 1 / chroma, and 1 where chroma is 0 (a grey pixel, whose hue is irrelevant).
    inv_chroma = np.clip(chroma, 1.0, 255.0)
    np.divide(1.0, inv_chroma, out=inv_chroma)
    # Hue in sixths of a turn, in [-1, 5): red is centred on 0, green on 2, blue on 4. The
    # channel at the max decides (red first, then green, then blue on ties):
    # (g - b) / c, (b - r) / c + 2 or (r - g) / c + 4.
    red_max = np.equal(red, maxc).astype(np.float32)
    green_max = np.equal(green, maxc).astype(np.float32)
    np.greater(green_max, red_max, out=green_max)  # green at the max and red not.
    blue_max = np.subtract(1.0, red_max)
    blue_max -= green_max
    numerator = np.subtract(green, blue)
    numerator *= red_max
    term = np.subtract(blue, red)
    term *= green_max
    numerator += term
    np.subtract(red, green, out=term)
    term *= blue_max
    numerator += term
    offset = np.multiply(green_max, 2.0, out=green_max)
    blue_max *= 4.0
    offset += blue_max
    hue6 = np.multiply(numerator, inv_chroma, out=numerator)
    hue6 += offset
    hue6 += (6.0 * np.asarray(shift, np.float32))[:, None, None]
    # HSV -> RGB: a channel is at max within 1 sixth of its centre, at min beyond 2, linear
    # between. hue6 lies in (-4, 8), so min(d, |d - 6|) is the distance around the circle.
    distance = np.subtract(hue6[:, None], _HUE_CENTRES)
    np.abs(distance, out=distance)
    wrapped = np.subtract(distance, 6.0)
    np.abs(wrapped, out=wrapped)
    np.minimum(distance, wrapped, out=distance)
    np.subtract(distance, 1.0, out=distance)
    np.clip(distance, 0.0, 1.0, out=distance)
    np.multiply(distance, chroma[:, None], out=distance)
    out = np.subtract(maxc[:, None], distance, out=x_Nx3xHxW)
    # Values stay within [min, max] of the input, so rounding needs no clipping.
    np.add(out, 0.5, out=out)
    np.floor(out, out=out)


def jitter_in_place(x_Nx3xHxW: np.ndarray, order: np.ndarray, factors_Nx4: np.ndarray) -> None:
    """ColorJitter, in place, on crops that all take the ops in the same `order` (4,)."""
    for op in order.tolist():
        if op == HUE:
            _rotate_hue(x_Nx3xHxW, factors_Nx4[:, HUE])
            continue
        factor = factors_Nx4[:, op].astype(np.float32)[:, None, None, None]
        if op == BRIGHTNESS:
            _adjust_brightness(x_Nx3xHxW, factor)
        elif op == CONTRAST:
            _adjust_contrast(x_Nx3xHxW, factor)
        else:
            _adjust_saturation(x_Nx3xHxW, factor)


NO_JITTER = 256  # The op-order code of a crop whose colour jitter is off.


def op_order_codes(apply: np.ndarray, order: np.ndarray) -> np.ndarray:
    """One integer per crop naming its op order (0..255), or NO_JITTER."""
    return np.where(apply, order @ np.array([64, 16, 4, 1]), NO_JITTER)


def color_jitter(
    x_Nx3xHxW: np.ndarray, apply: np.ndarray, order: np.ndarray, factors: np.ndarray
) -> np.ndarray:
    """torchvision ColorJitter with given parameters, per crop.

    apply (N,) bool; order (N, 4) a permutation of (BRIGHTNESS, CONTRAST, SATURATION, HUE) per
    crop; factors (N, 4) brightness, contrast, saturation factors and the hue shift, indexed by op.
    """
    x = x_Nx3xHxW
    codes = op_order_codes(apply, order)
    for code in np.unique(codes[apply]).tolist():
        rows = np.flatnonzero(codes == code)
        crops = x[rows]
        jitter_in_place(crops, order[rows[0]], factors[rows])
        x[rows] = crops
    return x


def solarize_in_place(x: np.ndarray) -> np.ndarray:
    """PIL's solarize at 128 on whole numbers: v -> 255 - v where v >= 128, in place."""
    inverted = np.greater_equal(x, 128.0).astype(np.float32)  # 0/1: faster than np.where.
    change = np.multiply(x, -2.0)
    change += 255.0
    change *= inverted
    x += change
    return x
