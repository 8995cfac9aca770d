"""Resizing the position embedding to another patch grid, exactly as the reference does.

The reference's `interpolate_pos_encoding` resamples the (grid x grid) patch positions bicubically
(PyTorch's kernel, A = -0.75, align_corners=False) with scale factors `(out + 0.1) / grid` (its
issue #8 offset) fed into the coordinate map. Separable float32 matrices built here reproduce it
bit for bit in the weights; `jax.image.resize` derives the scale from the sizes and antialiases
when shrinking, which PyTorch's plain bicubic does not.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def _torch_cubic_weights(t: np.ndarray) -> np.ndarray:
    """The 4 tap weights of PyTorch's bicubic kernel (A = -0.75) for offsets t, shape (..., 4)."""
    a = np.float32(-0.75)
    one, two = np.float32(1.0), np.float32(2.0)

    def near(x):  # |x| <= 1
        return ((a + two) * x - (a + np.float32(3.0))) * x * x + one

    def far(x):  # 1 < |x| < 2
        return ((a * x - np.float32(5.0) * a) * x + np.float32(8.0) * a) * x - np.float32(4.0) * a

    return np.stack([far(t + one), near(t), near(one - t), far(two - t)], axis=-1)


def bicubic_matrix(in_size: int, out_size: int, scale: float) -> np.ndarray:
    """(out_size, in_size) float32 matrix of PyTorch's 1-D bicubic resampling, align_corners=False,
    with the *given* scale factor in the coordinate map (what F.interpolate does when called with
    scale_factor and no size): src = (dst + 0.5) / scale - 0.5, taps clamped at the border.

    Coordinates and weights are computed in float32 from float32(1 / scale), as PyTorch does for
    float32 inputs, so the weights agree bit for bit and only summation order differs.
    """
    half = np.float32(0.5)
    src = np.float32(1.0 / scale) * (np.arange(out_size, dtype=np.float32) + half) - half
    floor = np.floor(src)
    weights = _torch_cubic_weights((src - floor).astype(np.float32))
    matrix = np.zeros((out_size, in_size), np.float32)
    for tap in range(4):
        index = np.clip(floor.astype(np.int64) - 1 + tap, 0, in_size - 1)
        np.add.at(matrix, (np.arange(out_size), index), weights[:, tap])
    return matrix


def pos_embed_resize_matrices(grid: int, out_h: int, out_w: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column matrices that resize a (grid, grid) position grid to (out_h, out_w) like the
    reference's interpolate_pos_encoding: scale factors (out + 0.1) / grid (its issue #8 offset).

    The separable matrices are built here rather than with jax.image.resize: the reference feeds
    the +0.1 scale factor into the coordinate map (sample points shift, not only the output size),
    while jax.image.resize derives the scale from the sizes and, when shrinking, antialiases with
    a widened kernel that PyTorch's plain bicubic does not use. The matrices depend on shapes
    only, so they are constants under jit.
    """
    scale_h = (out_h + 0.1) / grid
    scale_w = (out_w + 0.1) / grid
    # PyTorch derives the output size as floor(in * scale); the reference asserts it is the grid.
    got_h, got_w = math.floor(grid * scale_h), math.floor(grid * scale_w)
    if (got_h, got_w) != (out_h, out_w):
        raise ValueError(
            f"position grid {grid} scaled by ({scale_h}, {scale_w}) gives "
            f"({got_h}, {got_w}), expected ({out_h}, {out_w})"
        )
    return bicubic_matrix(grid, out_h, scale_h), bicubic_matrix(grid, out_w, scale_w)


def interpolate_pos_embed(pos_embed_1xTxD: jax.Array, out_h: int, out_w: int) -> jax.Array:
    """Resize the patch part of a (1, 1 + g*g, D) position embedding to an (out_h, out_w) patch
    grid, keeping the CLS position. Always resamples, even to the same grid (the +0.1 offset moves
    the sample points): whether to call it is `prepare_tokens`' decision."""
    num_patches = pos_embed_1xTxD.shape[1] - 1
    grid = math.isqrt(num_patches)
    if grid * grid != num_patches:
        raise ValueError(f"position embedding has {num_patches} patch positions, not a square grid")
    rows_HxG, cols_WxG = pos_embed_resize_matrices(grid, out_h, out_w)
    dim = pos_embed_1xTxD.shape[-1]
    patch_GxGxD = pos_embed_1xTxD[0, 1:].reshape(grid, grid, dim)
    # HIGHEST: the default matmul precision on TPU/GPU would round the embedding to bfloat16.
    resized_HxWxD = jnp.einsum(
        "hg,gkd,wk->hwd", rows_HxG, patch_GxGxD, cols_WxG, precision=jax.lax.Precision.HIGHEST
    )
    return jnp.concatenate([pos_embed_1xTxD[:, :1], resized_HxWxD.reshape(1, out_h * out_w, dim)], axis=1)
