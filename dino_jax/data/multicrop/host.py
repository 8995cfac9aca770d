"""DINO's multi-crop augmentation on the host, in numpy (REFERENCE.md §2.8).

Per crop, in the reference's order: RandomResizedCrop (bicubic) -> horizontal flip -> colour
jitter (brightness, contrast, saturation, hue in random order; p=0.8) -> grayscale (p=0.2) ->
Gaussian blur -> solarisation. The reference runs these through PIL one image at a time; here the
crops of one resolution are processed together in float32, which is what makes this path several
times faster than PIL on 32-64 px images (see bench/augment.py): crops that take the colour-jitter
ops in the same order are put next to each other, so every op runs on a contiguous block of crops
with no per-crop masks, and the work goes in chunks that stay in the CPU cache from the resize to
the 8-bit output.

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
Random numbers come from the numpy Generator passed in, so a crop depends only on it: grain seeds
it from (seed, example index).
"""

from __future__ import annotations

import functools
import itertools
import math
import threading

import numpy as np

from dino_jax.data.multicrop import spec
from dino_jax.data.multicrop.spec import BRIGHTNESS, CONTRAST, HUE, NUM_UNIFORMS, MultiCropConfig

# PIL's fixed-point ITU-R 601-2 luma weights ("L" conversion), scaled by 2^-16. The weighted sum
# of 8-bit values then needs at most 24 bits: float32 holds it exactly in any summation order, and
# floor(sum + 0.5) is PIL's (sum * 65536 + 32768) >> 16.
_LUMA_WEIGHTS = np.array([19595.0, 38470.0, 7471.0], np.float32) / 65536.0
_BOX_BLUR_PASSES = 3  # PIL approximates a Gaussian by this many box blurs.
_RESIZE_BLOCK = 32  # Output samples per block of a resize matrix (see _resize_blocks).
_BLUR_BLOCK = 16  # Output rows per block of a blur operator, on crops of 48 pixels and more.
_CHUNK_PIXELS = 1 << 15  # Crops go through the recipe in chunks of about this many pixels.
_HUE_CENTRES = np.array([0.0, 2.0, 4.0], np.float32)[None, :, None, None]  # R, G, B in sixths.

# Large temporaries (the float copy of the images, the blur operators, the chunk being
# processed) are kept per thread, up to this size each, and reused from batch to batch:
# allocating and freeing them every time costs page faults (the C allocator hands big blocks
# back to the kernel), measured at 5-10% of the host path's time.
_SCRATCH_MAX_BYTES = 16 << 20
_scratch = threading.local()


def _scratch_array(name: str, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """An uninitialised array of this thread's scratch space; valid until the next request for
    `name`, so never returned to a caller."""
    size = math.prod(shape)
    buffers = _scratch.__dict__.setdefault("buffers", {})
    buffer = buffers.get(name)
    if buffer is None or buffer.dtype != dtype or buffer.size < size:
        buffer = np.empty(size, dtype)
        if buffer.nbytes <= _SCRATCH_MAX_BYTES:
            buffers[name] = buffer
    return buffer[:size].reshape(shape)


# ----------------------------------------------------------------------------- resize


def _pil_bicubic(x: np.ndarray) -> np.ndarray:
    """PIL's bicubic kernel (a = -0.5), support 2."""
    a = -0.5
    x = np.abs(x)
    return np.where(
        x < 1.0,
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0,
        np.where(x < 2.0, (((x - 5.0) * x + 8.0) * x - 4.0) * a, 0.0),
    )


@functools.lru_cache(maxsize=4096)
def resize_matrix(in_size: int, out_size: int, flip: bool = False) -> np.ndarray:
    """(out_size, in_size) float32 weights of PIL's bicubic resize along one axis.

    Follows Pillow's `precompute_coeffs`: sample centres at (x + 0.5) * scale, the kernel widened
    by the scale when shrinking (antialiasing), taps clipped to the input and renormalised.
    `flip=True` reverses the output order, which is a horizontal flip of the resized image.
    """
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = 2.0 * filter_scale
    weights = np.zeros((out_size, in_size), np.float64)
    for out_index in range(out_size):
        centre = (out_index + 0.5) * scale
        first = max(int(centre - support + 0.5), 0)
        last = min(int(centre + support + 0.5), in_size)
        taps = np.arange(first, last)
        tap_weights = _pil_bicubic((taps - centre + 0.5) / filter_scale)
        total = tap_weights.sum()
        weights[out_index, first:last] = tap_weights / total if total != 0 else tap_weights
    if flip:
        weights = weights[::-1]
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


def _resize_into(
    out_Nx3xSxS: np.ndarray,
    images_BxHx3xW: np.ndarray,
    source_image: np.ndarray,
    boxes: np.ndarray,
    flips: np.ndarray,
) -> None:
    """`resized_crops` of images laid out (B, H, 3, W), written into `out_Nx3xSxS`.

    In that layout the rows of a crop, all three channels, are one (3 * crop_h, crop_w) matrix,
    so the horizontal pass is one matrix product per block of output columns.
    """
    size = out_Nx3xSxS.shape[-1]
    boxes = boxes.tolist()
    # Horizontal pass first, into an 8-bit intermediate, as Pillow does it. The crops' rows lie
    # back to back in one buffer, so one rounding call covers them all.
    offsets = np.cumsum([0] + [3 * crop_h * size for _, _, crop_h, _ in boxes]).tolist()
    rows = _scratch_array("resize_rows", (offsets[-1],))
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
    _resize_into(out, images_BxHx3xW, source_image, boxes, flips)
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


def _jitter_in_place(x_Nx3xHxW: np.ndarray, order: np.ndarray, factors_Nx4: np.ndarray) -> None:
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


_NO_JITTER = 256  # The op-order code of a crop whose colour jitter is off.


def _op_order_codes(apply: np.ndarray, order: np.ndarray) -> np.ndarray:
    """One integer per crop naming its op order (0..255), or _NO_JITTER."""
    return np.where(apply, order @ np.array([64, 16, 4, 1]), _NO_JITTER)


def _runs(keys: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) of the runs of equal consecutive values in `keys`."""
    edges = [0, *(np.flatnonzero(keys[1:] != keys[:-1]) + 1).tolist(), len(keys)]
    return list(itertools.pairwise(edges))


def _chunks(codes: np.ndarray, max_size: int) -> list[tuple[int, int]]:
    """(start, stop) of chunks of at most `max_size` that split as few runs of `codes` as possible:
    whole runs are packed together, and only a run longer than `max_size` is cut."""
    chunks = []
    first = 0
    for start, stop in _runs(codes):
        if stop - first > max_size and start > first:
            chunks.append((first, start))
            first = start
        while stop - first > max_size:
            chunks.append((first, first + max_size))
            first += max_size
    if first < len(codes):
        chunks.append((first, len(codes)))
    return chunks


def color_jitter(
    x_Nx3xHxW: np.ndarray, apply: np.ndarray, order: np.ndarray, factors: np.ndarray
) -> np.ndarray:
    """torchvision ColorJitter with given parameters, per crop.

    apply (N,) bool; order (N, 4) a permutation of (BRIGHTNESS, CONTRAST, SATURATION, HUE) per
    crop; factors (N, 4) brightness, contrast, saturation factors and the hue shift, indexed by op.
    """
    x = x_Nx3xHxW
    codes = _op_order_codes(apply, order)
    for code in np.unique(codes[apply]).tolist():
        rows = np.flatnonzero(codes == code)
        crops = x[rows]
        _jitter_in_place(crops, order[rows[0]], factors[rows])
        x[rows] = crops
    return x


# ----------------------------------------------------------------------------- blur


def pil_box_radius(sigma: np.ndarray) -> np.ndarray:
    """Pillow's extended-box radius whose `_BOX_BLUR_PASSES` passes have variance sigma²."""
    sigma2 = np.asarray(sigma, np.float64) ** 2 / _BOX_BLUR_PASSES
    box_length = np.sqrt(12.0 * sigma2 + 1.0)
    whole = np.floor((box_length - 1.0) / 2.0)
    frac = (2 * whole + 1) * (whole * (whole + 1) - 3 * sigma2)
    frac /= 6 * (sigma2 - (whole + 1) * (whole + 1))
    return whole + frac


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

    One pass averages a window of radius r = l + a (weight 1 on |d| <= l, a on |d| = l + 1,
    normalised by 2r + 1) with edge pixels repeated; three passes are composed into one matrix
    (in float64). A sigma of 0 gives the identity. Written into `out` when given.
    """
    sigma = np.asarray(sigma, np.float64)
    radius = pil_box_radius(np.maximum(sigma, 1e-6))
    whole = np.floor(radius)
    frac = radius - whole
    reach = int(whole.max()) + 1
    distance = np.arange(-reach, reach + 1, dtype=np.float64)
    weights = np.where(
        np.abs(distance) <= whole[:, None],
        1.0,
        np.where(np.abs(distance) == whole[:, None] + 1, frac[:, None], 0.0),
    )
    weights /= (2.0 * radius + 1.0)[:, None]
    # The composed operator is zero farther than `band` from its diagonal.
    band = _BOX_BLUR_PASSES * reach
    if size <= 2 * band:
        one_pass = _one_pass_matrices(weights, size, size, size)
        operator = one_pass
        for _ in range(_BOX_BLUR_PASSES - 1):
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
        for _ in range(_BOX_BLUR_PASSES - 1):
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
        for done in range(2, _BOX_BLUR_PASSES + 1):
            top = np.matmul(top, corner[:, : band + (done - 1) * reach, : band + done * reach])
        operator[:, :band, : 2 * band] = top
        operator[:, size - band :, size - 2 * band :] = top[:, ::-1, ::-1]
    operator[sigma <= 0] = np.eye(size)
    return operator


def _blur_band(sigma: np.ndarray) -> int:
    """How far from its diagonal `blur_matrices(sigma, size)` can be non-zero."""
    radius = pil_box_radius(np.maximum(np.asarray(sigma, np.float64), 1e-6))
    return _BOX_BLUR_PASSES * (int(np.floor(radius).max()) + 1)


def _blur_in_place(x_Nx3xSxS: np.ndarray, operators: np.ndarray, operators_t: np.ndarray, band: int) -> None:
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
    _blur_in_place(blurred, operators, np.ascontiguousarray(np.swapaxes(operators, 1, 2)), _blur_band(sigma))
    return blurred


# ----------------------------------------------------------------------------- the recipe


def _solarize(x: np.ndarray) -> np.ndarray:
    """PIL's solarize at 128 on whole numbers: v -> 255 - v where v >= 128, in place."""
    inverted = np.greater_equal(x, 128.0).astype(np.float32)  # 0/1: faster than np.where.
    change = np.multiply(x, -2.0)
    change += 255.0
    change *= inverted
    x += change
    return x


def _crop_group(images_BxHx3xW, uniforms_BxNxU, config: MultiCropConfig, group: spec.CropGroup) -> np.ndarray:
    """One resolution's crops of a batch through the whole recipe: uint8 (B, N, size, size, 3)."""
    batch, num_crops = uniforms_BxNxU.shape[:2]
    size = group.size
    if num_crops == 0:
        return np.zeros((batch, 0, size, size, 3), np.uint8)
    _, height, _, width = images_BxHx3xW.shape
    draws = spec.crop_draws(uniforms_BxNxU, config, group, height, width)
    boxes, flips, order, factors = draws.boxes, draws.flip, draws.order, draws.factors
    gray, blur, sigma, solarize = draws.gray, draws.blur, draws.sigma, draws.solarize
    source_image = np.repeat(np.arange(batch), num_crops)

    # Crops are processed in an order where each op runs on contiguous slices: crops that take
    # the jitter ops in the same order sit together, blurred ones first among them. The work
    # goes in chunks that stay in the CPU cache from the resize to the 8-bit output: the ~40
    # passes over the pixels then run several times faster than over the whole batch.
    codes = _op_order_codes(draws.jitter, order)
    work_order = np.lexsort((~blur, codes))
    codes, order, factors = codes[work_order], order[work_order], factors[work_order]
    gray, blur, solarize = gray[work_order], blur[work_order], solarize[work_order]
    boxes, flips = boxes[work_order], flips[work_order]
    source_image = source_image[work_order]
    # Blur operators for every blurred crop at once, in work order.
    blur_sigma = sigma[work_order][blur]
    blur_operators = blur_operators_t = blur_band = None
    if blur_sigma.size:
        blur_operators = blur_matrices(
            blur_sigma, size, out=_scratch_array("blur", (len(blur_sigma), size, size))
        )
        blur_operators_t = _scratch_array("blur_t", blur_operators.shape)
        np.copyto(blur_operators_t, np.swapaxes(blur_operators, 1, 2))
        blur_band = _blur_band(blur_sigma)
    blur_index = np.cumsum(blur) - 1  # A blurred crop's row in blur_operators.

    max_chunk = max(1, _CHUNK_PIXELS // (size * size))
    x_buffer = _scratch_array("crops", (min(max_chunk, len(boxes)), 3, size, size))
    crops = np.empty((len(boxes), size, size, 3), np.uint8)  # In the original order.
    for first, last in _chunks(codes, max_chunk):
        x = x_buffer[: last - first]
        _resize_into(x, images_BxHx3xW, source_image[first:last], boxes[first:last], flips[first:last])
        for start, stop in _runs(codes[first:last]):
            if codes[first + start] != _NO_JITTER:
                _jitter_in_place(x[start:stop], order[first + start], factors[first + start : first + stop])
        gray_rows = np.flatnonzero(gray[first:last])
        if gray_rows.size:
            x[gray_rows] = luma(x[gray_rows])[:, None]
        for start, stop in _runs(blur[first:last]):
            if blur[first + start]:
                operators = slice(blur_index[first + start], blur_index[first + start] + stop - start)
                _blur_in_place(
                    x[start:stop], blur_operators[operators], blur_operators_t[operators], blur_band
                )
        solarize_rows = np.flatnonzero(solarize[first:last])
        if solarize_rows.size:
            x[solarize_rows] = _solarize(x[solarize_rows])
        # Back to the original order and to (H, W, 3) uint8, one channel at a time: one strided
        # copy each, several times faster than a transpose then a cast.
        rows = work_order[first:last]
        for channel in range(3):
            crops[rows, :, :, channel] = x[:, channel]
    return crops.reshape(batch, num_crops, size, size, 3)


def draw_uniforms(rng: np.random.Generator, config: MultiCropConfig) -> np.ndarray:
    """All random numbers one image's crops use: (2 + num_local_crops, NUM_UNIFORMS) in [0, 1)."""
    return rng.random((2 + config.num_local_crops, NUM_UNIFORMS))


def multicrop_from_uniforms(
    images_BxHxWx3: np.ndarray, uniforms: np.ndarray, config: MultiCropConfig
) -> tuple[np.ndarray, np.ndarray]:
    """The recipe on a batch, given each image's `draw_uniforms` rows stacked as (B, 2 + L, U)."""
    images = np.asarray(images_BxHxWx3)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"multicrop: expected uint8 images of shape (B, H, W, 3), got {images.dtype} {images.shape}"
        )
    expected = spec.uniforms_shape(len(images), config)
    if uniforms.shape != expected:
        raise ValueError(f"multicrop: uniforms have shape {uniforms.shape}; expected {expected}")
    images_BxHx3xW = _scratch_array("images", (len(images), images.shape[1], 3, images.shape[2]))
    np.copyto(images_BxHx3xW, images.transpose(0, 1, 3, 2))
    global_crops, local_crops = (
        _crop_group(images_BxHx3xW, uniforms[:, group.views], config, group)
        for group in spec.crop_groups(config)
    )
    return global_crops, local_crops


def multicrop_batch(
    images_BxHxWx3: np.ndarray, rngs, config: MultiCropConfig
) -> tuple[np.ndarray, np.ndarray]:
    """`multicrop` of each image with its own generator, computed together (much faster).

    Returns (uint8 (B, 2, G, G, 3), uint8 (B, L, l, l, 3)); row b equals
    `multicrop(images[b], rngs[b], config)` for generators in the same state.
    """
    uniforms = np.stack([draw_uniforms(rng, config) for rng in rngs])
    return multicrop_from_uniforms(images_BxHxWx3, uniforms, config)


def multicrop(
    image: np.ndarray, rng: np.random.Generator, config: MultiCropConfig
) -> tuple[np.ndarray, np.ndarray]:
    """DINO multi-crop of one image.

    Args:
      image: uint8 (H, W, 3).
      rng: the only source of randomness; the same generator state gives the same crops.
      config: the recipe.
    Returns:
      (global_crops uint8 (2, G, G, 3) in the order [global 1, global 2],
       local_crops uint8 (L, l, l, 3)).
    """
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"multicrop: expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    global_crops, local_crops = multicrop_batch(image[None], [rng], config)
    return global_crops[0], local_crops[0]
