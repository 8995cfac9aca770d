"""DINO's multi-crop as jitted JAX ops, run inside the train step on uint8 batches.

The same recipe and the same random-number layout as the host path (`host.py`, `spec.py`): every crop
reads its decisions and parameters from one row of `spec.NUM_UNIFORMS` uniforms, so given the
same uniforms both paths produce the same crops up to float32 rounding (tests check this), and
their statistics agree by construction. Everything is shape-static: crop boxes of any size are
expressed as dense per-crop resize matrices, and ops that fire on some crops only are computed
for all and selected, which is what accelerators want.

Library use (dm-pix) and where it does not fit the reference (torchvision on PIL images):
- used: `dm_pix.adjust_hue` (float HSV rotation, as the host path), `dm_pix.rgb_to_grayscale`
  (ITU-R 601 luma; PIL's fixed-point weights differ by < 0.03 levels), `dm_pix.solarize`.
- not used for brightness, contrast, saturation: dm-pix follows tf.image, where brightness is an
  added delta (torchvision multiplies), contrast pulls each channel to its own mean (torchvision
  to the mean luma) and saturation scales HSV saturation (torchvision blends with the luma
  image). Written here as torchvision's blends.
- not used for blur: `dm_pix.gaussian_blur` convolves a sampled Gaussian with zero padding,
  which darkens the borders of a 16-pixel crop; the reference (PIL) repeats edge pixels and
  approximates the Gaussian by three box filters. Written here as PIL's operator, a matrix.
- not used for crop + resize (`dm_pix.random_crop` has a fixed size and no resize;
  `jax.image.scale_and_translate` would read pixels outside the crop box at its border, where
  PIL's resize of the cropped image renormalises): PIL's bicubic resize written as matrices.
- flip is folded into the horizontal resize matrix (free).
"""

from __future__ import annotations

import dm_pix
import jax
import jax.numpy as jnp
import numpy as np

from dino_jax.data.multicrop import box_blur, resize, spec
from dino_jax.data.multicrop.spec import CONTRAST, HUE, SATURATION, MultiCropConfig

_HIGHEST = jax.lax.Precision.HIGHEST  # Resampling must not run in bf16/TF32 on GPUs and TPUs.


def _round_to_uint8_range(x):
    # The host kernels' rounding (resize.round_to_uint8_range), written as a pure function: theirs
    # work in place.
    return jnp.clip(jnp.floor(x + 0.5), 0.0, 255.0)


def resized_crops(images_BxHxWx3, boxes_BxNx4, flips_BxN, size: int):
    """Float (B, N, size, size, 3) crops, resized like PIL (horizontal pass first, 8-bit between)."""
    batch, num_crops = boxes_BxNx4.shape[:2]
    _, height, width, _ = images_BxHxWx3.shape
    boxes = boxes_BxNx4.reshape(batch * num_crops, 4)
    # The host's coefficients (resize.resize_weights) in float32, each box's placed in the image.
    rows = resize.resize_weights(boxes[:, 0], boxes[:, 2], height, size, xp=jnp, dtype=jnp.float32)
    flips = flips_BxN.reshape(-1)
    cols = resize.resize_weights(boxes[:, 1], boxes[:, 3], width, size, flips, xp=jnp, dtype=jnp.float32)
    rows = rows.reshape(batch, num_crops, size, height)
    cols = cols.reshape(batch, num_crops, size, width)
    images = images_BxHxWx3.astype(jnp.float32)
    horizontal = jnp.einsum("bhwc,bnsw->bnhsc", images, cols, precision=_HIGHEST)
    horizontal = _round_to_uint8_range(horizontal)
    out = jnp.einsum("bnth,bnhsc->bntsc", rows, horizontal, precision=_HIGHEST)
    return _round_to_uint8_range(out)


def luma(rgb):
    """Rounded ITU-R 601 luma of 0..255 RGB (channels last), shape without the channel axis."""
    return jnp.floor(dm_pix.rgb_to_grayscale(rgb / 255.0)[..., 0] * 255.0 + 0.5)


def _hue(x_NxSxSx3, shift):
    # dm-pix adds the shift to the (N, S, S) hue plane.
    rotated = dm_pix.adjust_hue(x_NxSxSx3 / 255.0, shift[:, None, None]) * 255.0
    return _round_to_uint8_range(rotated)


def color_jitter(x_NxSxSx3, apply, order, factors):
    """torchvision ColorJitter with given parameters per crop (see the host's `color.color_jitter`).

    Every op is computed for every crop and selected, as one blend whose degenerate image and
    factor depend on the op: shape-static, unlike the kernels' in-place runs of crops that share
    an op order.
    """
    rows = jnp.arange(x_NxSxSx3.shape[0])
    x = x_NxSxSx3
    for step in range(4):
        op = order[:, step]
        factor = factors[rows, op]
        gray = luma(x)
        mean_gray = jnp.floor(jnp.mean(gray, axis=(1, 2)) + 0.5)
        degenerate = jnp.where(
            (op == SATURATION)[:, None, None], gray, jnp.where(op == CONTRAST, mean_gray, 0.0)[:, None, None]
        )[..., None]
        blend_factor = jnp.where(apply & (op != HUE), factor, 1.0)[:, None, None, None]
        x = jnp.floor(jnp.clip(degenerate + blend_factor * (x - degenerate), 0.0, 255.0))
        hue_shift = jnp.where(apply & (op == HUE), factor, 0.0)
        x = jnp.where((apply & (op == HUE))[:, None, None, None], _hue(x, hue_shift), x)
    return x


def blur_operators(sigma, size: int, max_sigma: float):
    """(n, size, size) operators of PIL's GaussianBlur(radius=sigma) along one axis.

    The taps of one box pass are the kernels' (`box_blur.box_pass_weights`), for a reach fixed by
    `max_sigma` so the shapes are static; the one-pass matrices are built from one-hot rows and
    composed by float32 products, where the kernels build only a corner and compose in float64.
    """
    radius = box_blur.pil_box_radius(jnp.maximum(sigma, 1e-6), jnp)
    reach = int(np.floor(box_blur.pil_box_radius(np.array([max_sigma]))[0])) + 1
    weights = box_blur.box_pass_weights(radius, reach, jnp)
    source = np.clip(np.arange(size)[:, None] + np.arange(-reach, reach + 1)[None], 0, size - 1)
    taps = np.eye(size, dtype=np.float32)[source]  # (size, taps, size) one-hot of the source row.
    one_pass = jnp.einsum("nt,ytx->nyx", weights, taps, precision=_HIGHEST)
    operator = jnp.einsum("nab,nbc->nac", one_pass, one_pass, precision=_HIGHEST)
    return jnp.einsum("nab,nbc->nac", one_pass, operator, precision=_HIGHEST)


def gaussian_blur(x_NxSxSx3, sigma, blur, max_sigma: float):
    """Blurs the crops where `blur` (N,) is set, each with its own sigma in crop pixels."""
    operator = blur_operators(sigma, x_NxSxSx3.shape[1], max_sigma)
    blurred = jnp.einsum("nyh,nhwc,nxw->nyxc", operator, x_NxSxSx3, operator, precision=_HIGHEST)
    return jnp.where(blur[:, None, None, None], _round_to_uint8_range(blurred), x_NxSxSx3)


def _crop_group(images_BxHxWx3, u_BxNxU, config: MultiCropConfig, group: spec.CropGroup):
    batch, num_crops = u_BxNxU.shape[:2]
    size = group.size
    if num_crops == 0:
        return jnp.zeros((batch, 0, size, size, 3), jnp.float32)
    _, height, width, _ = images_BxHxWx3.shape
    draws = spec.crop_draws(u_BxNxU, config, group, height, width, jnp, jnp.float32)
    x = resized_crops(
        images_BxHxWx3,
        draws.boxes.reshape(batch, num_crops, 4),
        draws.flip.reshape(batch, num_crops),
        size,
    )
    x = x.reshape(batch * num_crops, size, size, 3)
    x = color_jitter(x, draws.jitter, draws.order, draws.factors)
    x = jnp.where(draws.gray[:, None, None, None], luma(x)[..., None], x)
    if float(np.max(group.blur_p)) > 0:
        x = gaussian_blur(x, draws.sigma, draws.blur, config.blur_sigma[1])
    x = jnp.where(draws.solarize[:, None, None, None], dm_pix.solarize(x / 255.0, 128.0 / 255.0) * 255.0, x)
    return jnp.round(x).reshape(batch, num_crops, size, size, 3)


def multicrop_from_uniforms(images_BxHxWx3, uniforms_BxVxU, config: MultiCropConfig):
    """The recipe given each image's uniforms (B, 2 + L, NUM_UNIFORMS), as on the host."""
    if images_BxHxWx3.ndim != 4 or images_BxHxWx3.shape[-1] != 3:
        raise ValueError(
            f"multicrop_batch: expected images of shape (B, H, W, 3), got {images_BxHxWx3.shape}"
        )
    expected = spec.uniforms_shape(images_BxHxWx3.shape[0], config)
    if tuple(uniforms_BxVxU.shape) != expected:
        raise ValueError(f"multicrop_batch: uniforms have shape {uniforms_BxVxU.shape}; expected {expected}")
    global_crops, local_crops = (
        _crop_group(images_BxHxWx3, uniforms_BxVxU[:, group.views], config, group)
        for group in spec.crop_groups(config)
    )
    return global_crops, local_crops


def multicrop_batch(images_uint8_BxHxWx3, rng, config: MultiCropConfig):
    """DINO multi-crop of a batch on the accelerator; traceable (call it inside your jit).

    Args:
      images_uint8_BxHxWx3: uint8 images, one size for the whole batch.
      rng: a JAX PRNG key. One uniform draw of shape (B, 2 + L, NUM_UNIFORMS) feeds every
        decision, so under jit with a sharded batch XLA splits it like any other array.
      config: the recipe (static).
    Returns:
      (global_crops float32 (B, 2, G, G, 3), local_crops float32 (B, L, l, l, 3)), whole numbers in
      [0, 255], ready for `normalize.normalize_images`.
    """
    shape = spec.uniforms_shape(images_uint8_BxHxWx3.shape[0], config)
    uniforms = jax.random.uniform(rng, shape, jnp.float32)
    return multicrop_from_uniforms(images_uint8_BxHxWx3, uniforms, config)
