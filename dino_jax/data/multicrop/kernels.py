"""PIL-exact image kernels of the multi-crop recipe, in numpy.

Where PIL's integer arithmetic shapes the result, it is reproduced:
- Bicubic resizing uses PIL's kernel (a=-0.5), its antialiasing support when shrinking, its
  renormalised weights at the crop border, and its horizontal-then-vertical passes with an 8-bit
  intermediate; the coefficients are precomputed per (input size, output size) and applied as
  small matrix products, cut into blocks that skip the zero weights far from each output sample.
  A flip is the same resize with the output columns reversed.
- Brightness, contrast and saturation are PIL blends with a degenerate image (black, the rounded
  mean luma, the luma image), truncated to 8 bits like `Image.blend`.
- Grayscale and every luma use PIL's fixed-point ITU-R 601 weights (19595, 38470, 7471)/65536.
- Blur is what PIL's GaussianBlur computes: three passes of an extended box filter whose variance
  sums to radius², edges clamped; the three passes are composed (in float64) into one banded
  matrix per crop.
Where it does not, it is a float operation on purpose:
- Hue is rotated in float HSV (as torchvision does for tensors). PIL's own path stores hue in 8
  bits, a 1.4 degree step, and so perturbs every jittered pixel by up to a few levels; that noise
  is an artefact of PIL, not part of the recipe.

The formulas the device path (`device.py`) needs too are written once over an array module `xp`
(numpy or jax.numpy): `resize_weights` (with `bicubic`), `pil_box_radius`, `box_pass_weights`. The
rest is numpy only: it works in place on float32 crops laid out (N, 3, H, W), which is what makes
the host path fast; the device path writes the same operations as shape-static JAX ops.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any

import numpy as np

from dino_jax.data.multicrop.spec import BRIGHTNESS, CONTRAST, HUE

# PIL's fixed-point ITU-R 601-2 luma weights ("L" conversion), scaled by 2^-16. The weighted sum
# of 8-bit values then needs at most 24 bits: float32 holds it exactly in any summation order, and
# floor(sum + 0.5) is PIL's (sum * 65536 + 32768) >> 16.
_LUMA_WEIGHTS = np.array([19595.0, 38470.0, 7471.0], np.float32) / 65536.0
BOX_BLUR_PASSES = 3  # PIL approximates a Gaussian by this many box blurs.
_RESIZE_BLOCK = 32  # Output samples per block of a resize matrix (see _resize_blocks).
_BLUR_BLOCK = 16  # Output rows per block of a blur operator, on crops of 48 pixels and more.
_HUE_CENTRES = np.array([0.0, 2.0, 4.0], np.float32)[None, :, None, None]  # R, G, B in sixths.


# ----------------------------------------------------------------------------- resize


def bicubic(x, xp: Any = np):
    """PIL's bicubic kernel (a = -0.5), support 2."""
    a = -0.5
    x = xp.abs(x)
    return xp.where(
        x < 1.0,
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0,
        xp.where(x < 2.0, (((x - 5.0) * x + 8.0) * x - 4.0) * a, 0.0),
    )


def resize_weights(start, length, in_size: int, out_size: int, flip=None, xp: Any = np, dtype=np.float64):
    """(n, out_size, in_size) weights of PIL's bicubic resize of [start, start + length) of an axis.

    Follows Pillow's `precompute_coeffs`: sample centres at (x + 0.5) * scale, the kernel widened
    by the scale when shrinking (antialiasing), taps limited to the crop and renormalised. `start`,
    `length` (n,); `flip` (n,) bool reverses the output order, a horizontal flip of the resized
    image. numpy in float64 gives the host's `resize_matrix`; jax.numpy in float32 (traceable, so
    boxes of any size are dense matrices of one shape) the device's.
    """
    length = length.astype(dtype)[:, None, None]
    scale = length / out_size
    filter_scale = xp.maximum(scale, 1.0)
    support = 2.0 * filter_scale
    out_index = xp.arange(out_size, dtype=dtype)[None, :, None]
    if flip is not None:
        out_index = xp.where(flip[:, None, None], out_size - 1 - out_index, out_index)
    centre = (out_index + 0.5) * scale
    first = xp.maximum(xp.floor(centre - support + 0.5), 0.0)
    last = xp.minimum(xp.floor(centre + support + 0.5), length)
    position = xp.arange(in_size, dtype=dtype)[None, None, :] - start[:, None, None]
    inside = (position >= first) & (position < last)
    weights = xp.where(inside, bicubic((position - centre + 0.5) / filter_scale, xp), 0.0)
    return weights / xp.sum(weights, axis=-1, keepdims=True)


@functools.lru_cache(maxsize=4096)
def resize_matrix(in_size: int, out_size: int, flip: bool = False) -> np.ndarray:
    """(out_size, in_size) float32 weights of PIL's bicubic resize along one axis (`resize_weights`
    of the whole axis, in float64). `flip=True` reverses the output order."""
    weights = resize_weights(np.zeros(1), np.array([in_size]), in_size, out_size, np.array([flip]))[0]
    weights = np.ascontiguousarray(weights, np.float32)
    weights.setflags(write=False)
    return weights


def _round_to_uint8_range(x: np.ndarray) -> np.ndarray:
    """In place: round half up and clip to [0, 255], as PIL stores a float result in 8 bits."""
    np.add(x, 0.5, out=x)
    np.floor(x, out=x)
    np.clip(x, 0.0, 255.0, out=x)
    return x


def _contiguous_constant(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x)
    x.setflags(write=False)
    return x


@functools.lru_cache(maxsize=4096)
def _resize_blocks(in_size: int, out_size: int, flip: bool) -> tuple:
    """`resize_matrix` cut into blocks of about `_RESIZE_BLOCK` output samples.

    A bicubic weight row is zero outside ~4 input samples (a few more when shrinking), so a
    block only reads the input range [in_start, in_stop) its rows touch, and the block products
    skip most of the zeros of the dense matrix. Returns a tuple of (out_start, out_stop,
    in_start, in_stop, weights, weights.T), both weight blocks contiguous float32.
    """
    weights = resize_matrix(in_size, out_size, flip)
    num_blocks = max(1, round(out_size / _RESIZE_BLOCK))
    if num_blocks == 1:
        return ((0, out_size, 0, in_size, weights, _contiguous_constant(weights.T)),)
    bounds = [round(i * out_size / num_blocks) for i in range(num_blocks + 1)]
    blocks = []
    for out_start, out_stop in itertools.pairwise(bounds):
        used = np.flatnonzero(weights[out_start:out_stop].any(axis=0))
        in_start, in_stop = int(used[0]), int(used[-1]) + 1
        block = _contiguous_constant(weights[out_start:out_stop, in_start:in_stop])
        blocks.append((out_start, out_stop, in_start, in_stop, block, _contiguous_constant(block.T)))
    return tuple(blocks)


def resize_into(
    out_Nx3xSxS: np.ndarray,
    images_BxHx3xW: np.ndarray,
    source_image: np.ndarray,
    boxes: np.ndarray,
    flips: np.ndarray,
    rows: np.ndarray | None = None,
) -> None:
    """`resized_crops` of images laid out (B, H, 3, W), written into `out_Nx3xSxS`.

    In that layout the rows of a crop, all three channels, are one (3 * crop_h, crop_w) matrix,
    so the horizontal pass is one matrix product per block of output columns. `rows`, when given,
    is float32 space for the intermediate: at least 3 * size * (sum of the crop heights) values.
    """
    size = out_Nx3xSxS.shape[-1]
    boxes = boxes.tolist()
    # Horizontal pass first, into an 8-bit intermediate, as Pillow does it. The crops' rows lie
    # back to back in one buffer, so one rounding call covers them all.
    offsets = np.cumsum([0] + [3 * crop_h * size for _, _, crop_h, _ in boxes]).tolist()
    rows = np.empty(offsets[-1], np.float32) if rows is None else rows[: offsets[-1]]
    rows_3xHxS = []
    for (top, left, crop_h, crop_w), image, flip, start, stop in zip(
        boxes, source_image.tolist(), flips.tolist(), offsets, offsets[1:]
    ):
        crop = images_BxHx3xW[image, top : top + crop_h, :, left : left + crop_w].reshape(3 * crop_h, crop_w)
        crop_rows = rows[start:stop].reshape(3 * crop_h, size)
        blocks = _resize_blocks(crop_w, size, flip)
        if len(blocks) == 1:  # np.dot has less overhead than np.matmul.
            np.dot(crop, blocks[0][-1], out=crop_rows)
        else:
            for out_start, out_stop, in_start, in_stop, _, weights_t in blocks:
                np.matmul(crop[:, in_start:in_stop], weights_t, out=crop_rows[:, out_start:out_stop])
        rows_3xHxS.append(crop_rows.reshape(crop_h, 3, size).transpose(1, 0, 2))
    _round_to_uint8_range(rows)
    for (_, _, crop_h, _), crop_rows, crop_out in zip(boxes, rows_3xHxS, out_Nx3xSxS):
        blocks = _resize_blocks(crop_h, size, False)
        if len(blocks) == 1:
            np.matmul(blocks[0][-2], crop_rows, out=crop_out)
        else:
            for out_start, out_stop, in_start, in_stop, weights, _ in blocks:
                np.matmul(weights, crop_rows[:, in_start:in_stop], out=crop_out[:, out_start:out_stop])
    _round_to_uint8_range(out_Nx3xSxS)


def resized_crops(
    images_Bx3xHxW: np.ndarray, source_image: np.ndarray, boxes: np.ndarray, flips: np.ndarray, size: int
) -> np.ndarray:
    """Crops `boxes` of planar float32 images, resizes each to `size` (PIL bicubic), flips some.

    Crop n is taken from image `source_image[n]`. Returns float32 `(n, 3, size, size)` holding
    integers in [0, 255].
    """
    out = np.empty((len(boxes), 3, size, size), np.float32)
    images_BxHx3xW = np.ascontiguousarray(np.swapaxes(images_Bx3xHxW, 1, 2), np.float32)
    resize_into(out, images_BxHx3xW, source_image, boxes, flips)
    return out


# ----------------------------------------------------------------------------- colour
#
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


# ----------------------------------------------------------------------------- blur


def pil_box_radius(sigma, xp: Any = np):
    """Pillow's extended-box radius whose `BOX_BLUR_PASSES` passes have variance sigma²."""
    sigma2 = sigma**2 / BOX_BLUR_PASSES
    box_length = xp.sqrt(12.0 * sigma2 + 1.0)
    whole = xp.floor((box_length - 1.0) / 2.0)
    frac = (2 * whole + 1) * (whole * (whole + 1) - 3 * sigma2)
    frac = frac / (6 * (sigma2 - (whole + 1) * (whole + 1)))
    return whole + frac


def box_pass_weights(radius, reach: int, xp: Any = np):
    """(n, 2 * reach + 1) taps, at distances -reach..reach, of one pass of an extended box of
    each radius r = l + a: weight 1 on |d| <= l, a on |d| = l + 1, normalised by 2r + 1."""
    whole = xp.floor(radius)
    frac = radius - whole
    distance = np.abs(np.arange(-reach, reach + 1))[None]
    weights = xp.where(
        distance <= whole[:, None], 1.0, xp.where(distance == whole[:, None] + 1, frac[:, None], 0.0)
    )
    return weights / (2.0 * radius + 1.0)[:, None]


def _one_pass_matrices(weights: np.ndarray, num_rows: int, num_cols: int, size: int) -> np.ndarray:
    """Top-left (num_rows, num_cols) corner of the (N, size, size) one-pass box-blur matrices.

    Row y averages rows clip(y + d, 0, size - 1) with `weights[:, reach + d]`, |d| <= reach.
    """
    reach = (weights.shape[1] - 1) // 2
    rows = np.arange(num_rows)
    source = np.clip(rows[:, None] + np.arange(-reach, reach + 1)[None, :], 0, size - 1)
    one_pass = np.zeros((len(weights), num_rows, num_cols))
    for tap in range(2 * reach + 1):
        one_pass[:, rows, source[:, tap]] += weights[:, tap][:, None]
    return one_pass


def blur_matrices(sigma: np.ndarray, size: int, out: np.ndarray | None = None) -> np.ndarray:
    """(N, size, size) float32 operators of PIL's GaussianBlur(radius=sigma) along one axis.

    One pass averages a window (`box_pass_weights`) with edge pixels repeated; three passes are
    composed into one matrix (in float64). A sigma of 0 gives the identity. Written into `out`
    when given.
    """
    sigma = np.asarray(sigma, np.float64)
    radius = pil_box_radius(np.maximum(sigma, 1e-6))
    reach = int(np.floor(radius).max()) + 1
    weights = box_pass_weights(radius, reach)
    # The composed operator is zero farther than `band` from its diagonal.
    band = BOX_BLUR_PASSES * reach
    if size <= 2 * band:
        one_pass = _one_pass_matrices(weights, size, size, size)
        operator = one_pass
        for _ in range(BOX_BLUR_PASSES - 1):
            operator = np.matmul(one_pass, operator)
        if out is None:
            out = np.empty((len(sigma), size, size), np.float32)
        out[...] = operator
        operator = out
    else:
        # Rows at least `band` from both edges never reach the clamping: they hold the 1D kernel,
        # the weights convolved with themselves. The `band` rows at the top are composed from
        # the corner of the one-pass matrices; the bottom ones mirror them (every matrix here is
        # unchanged by reversing both its rows and its columns).
        kernel = weights
        for _ in range(BOX_BLUR_PASSES - 1):
            wider = np.zeros((len(sigma), kernel.shape[1] + 2 * reach))
            for tap in range(2 * reach + 1):
                wider[:, tap : tap + kernel.shape[1]] += kernel * weights[:, tap : tap + 1]
            kernel = wider
        operator = np.zeros((len(sigma), size, size), np.float32) if out is None else out
        if out is not None:
            operator.fill(0.0)
        # The interior rows' diagonals, seen as an (N, rows, 2 * band + 1) array.
        step_n, step_row, step_col = operator.strides
        diagonals = np.lib.stride_tricks.as_strided(
            operator[:, band:],
            (len(sigma), size - 2 * band, 2 * band + 1),
            (step_n, step_row + step_col, step_col),
            writeable=True,
        )
        diagonals[...] = kernel[:, None, :]
        corner = _one_pass_matrices(weights, 2 * band - reach, 2 * band, size)
        top = corner[:, :band, : band + reach]
        for done in range(2, BOX_BLUR_PASSES + 1):
            top = np.matmul(top, corner[:, : band + (done - 1) * reach, : band + done * reach])
        operator[:, :band, : 2 * band] = top
        operator[:, size - band :, size - 2 * band :] = top[:, ::-1, ::-1]
    operator[sigma <= 0] = np.eye(size)
    return operator


def blur_band(sigma: np.ndarray) -> int:
    """How far from its diagonal `blur_matrices(sigma, size)` can be non-zero."""
    radius = pil_box_radius(np.maximum(np.asarray(sigma, np.float64), 1e-6))
    return BOX_BLUR_PASSES * (int(np.floor(radius).max()) + 1)


def blur_in_place(x_Nx3xSxS: np.ndarray, operators: np.ndarray, operators_t: np.ndarray, band: int) -> None:
    """Applies (N, S, S) operators (and their transposes) along both axes of contiguous crops,
    rounding to 8 bits. The operators are zero farther than `band` from their diagonal."""
    num_crops, _, size, _ = x_Nx3xSxS.shape
    if size < 3 * _BLUR_BLOCK or 2 * band >= _BLUR_BLOCK:
        vertical = np.matmul(operators[:, None], x_Nx3xSxS)
        # The horizontal pass as one (3S, S) @ (S, S) product per crop.
        np.matmul(
            vertical.reshape(num_crops, 3 * size, size),
            operators_t,
            out=x_Nx3xSxS.reshape(num_crops, 3 * size, size),
        )
    else:
        # Blocks of output rows (then columns) read only the band of input they need.
        bounds = [*range(0, size, _BLUR_BLOCK), size]
        blocks = [
            (start, stop, max(0, start - band), min(size, stop + band))
            for start, stop in itertools.pairwise(bounds)
        ]
        vertical = np.empty_like(x_Nx3xSxS)
        for start, stop, low, high in blocks:
            np.matmul(
                operators[:, None, start:stop, low:high],
                x_Nx3xSxS[:, :, low:high],
                out=vertical[:, :, start:stop],
            )
        for start, stop, low, high in blocks:
            np.matmul(
                vertical[..., low:high],
                operators_t[:, None, low:high, start:stop],
                out=x_Nx3xSxS[..., start:stop],
            )
    _round_to_uint8_range(x_Nx3xSxS)


def gaussian_blur(x_Nx3xSxS: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Blurs each crop with its own sigma (pixels of the crop); sigma 0 leaves a crop as it is."""
    blurred = np.array(x_Nx3xSxS, np.float32)
    operators = blur_matrices(sigma, blurred.shape[-1])
    blur_in_place(blurred, operators, np.ascontiguousarray(np.swapaxes(operators, 1, 2)), blur_band(sigma))
    return blurred


# ----------------------------------------------------------------------------- solarize


def solarize_in_place(x: np.ndarray) -> np.ndarray:
    """PIL's solarize at 128 on whole numbers: v -> 255 - v where v >= 128, in place."""
    inverted = np.greater_equal(x, 128.0).astype(np.float32)  # 0/1: faster than np.where.
    change = np.multiply(x, -2.0)
    change += 255.0
    change *= inverted
    x += change
    return x
