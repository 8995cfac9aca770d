"""PIL's bicubic resize of crops, exactly, in numpy: the multi-crop recipe's RandomResizedCrop (and
its flip) on the host (`host.py`), and the resize of evaluation images (`data/pipeline.py`).

PIL's kernel (a=-0.5), its antialiasing support when shrinking, its renormalised weights at the crop
border, and its horizontal-then-vertical passes with an 8-bit intermediate; the coefficients are
precomputed per (input size, output size) and applied as small matrix products, cut into blocks
that skip the zero weights far from each output sample. A flip is the same resize with the output
columns reversed.

`resize_weights` (with `bicubic`) is written over an array module `xp` (numpy or jax.numpy): the
device path (`device.py`) builds its resize matrices from it. The rest works on float32 crops in
numpy. The other PIL-exact kernels: `color.py` (colour jitter, grayscale, solarize), `box_blur.py`.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any

import numpy as np

_RESIZE_BLOCK = 32  # Output samples per block of a resize matrix (see _resize_blocks).


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


def round_to_uint8_range(x: np.ndarray) -> np.ndarray:
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
    round_to_uint8_range(rows)
    for (_, _, crop_h, _), crop_rows, crop_out in zip(boxes, rows_3xHxS, out_Nx3xSxS):
        blocks = _resize_blocks(crop_h, size, False)
        if len(blocks) == 1:
            np.matmul(blocks[0][-2], crop_rows, out=crop_out)
        else:
            for out_start, out_stop, in_start, in_stop, weights, _ in blocks:
                np.matmul(weights, crop_rows[:, in_start:in_stop], out=crop_out[:, out_start:out_stop])
    round_to_uint8_range(out_Nx3xSxS)


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
