"""PIL's GaussianBlur, exactly, in numpy: three passes of an extended box filter whose variance sums
to radius², edges clamped; the three passes are composed (in float64) into one banded matrix per
crop, applied along both axes of float32 crops laid out (N, 3, S, S) and rounded to 8 bits.

`pil_box_radius` and `box_pass_weights` are written over an array module `xp` (numpy or jax.numpy):
the device path (`device.py`) builds its blur from them.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from dino_jax.data.multicrop.resize import round_to_uint8_range

BOX_BLUR_PASSES = 3  # PIL approximates a Gaussian by this many box blurs.
_BLUR_BLOCK = 16  # Output rows per block of a blur operator, on crops of 48 pixels and more.


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
    round_to_uint8_range(x_Nx3xSxS)


def gaussian_blur(x_Nx3xSxS: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Blurs each crop with its own sigma (pixels of the crop); sigma 0 leaves a crop as it is."""
    blurred = np.array(x_Nx3xSxS, np.float32)
    operators = blur_matrices(sigma, blurred.shape[-1])
    blur_in_place(blurred, operators, np.ascontiguousarray(np.swapaxes(operators, 1, 2)), blur_band(sigma))
    return blurred
