"""DINO's multi-crop on the host, in numpy: the recipe of `spec.py` with the PIL-exact kernels of
`resize.py`, `color.py` and `box_blur.py`.

The reference runs the recipe through PIL one image at a time; here the crops of one resolution
are processed together in float32, which is what makes this path several times faster than PIL on
32-64 px images (see bench/augment.py): crops that take the colour-jitter ops in the same order
are put next to each other, so every op runs on a contiguous block of crops with no per-crop
masks, and the work goes in chunks that stay in the CPU cache from the resize to the 8-bit
output. Large temporaries live in per-thread scratch space, reused from batch to batch.

Random numbers come from the numpy Generator passed in, so a crop depends only on it: grain seeds
it from (seed, example index).
"""

from __future__ import annotations

import itertools
import math
import threading

import numpy as np

from dino_jax.data.multicrop import box_blur, color, resize, spec
from dino_jax.data.multicrop.spec import NUM_UNIFORMS, MultiCropConfig

_CHUNK_PIXELS = 1 << 15  # Crops go through the recipe in chunks of about this many pixels.

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
    codes = color.op_order_codes(draws.jitter, order)
    work_order = np.lexsort((~blur, codes))
    codes, order, factors = codes[work_order], order[work_order], factors[work_order]
    gray, blur, solarize = gray[work_order], blur[work_order], solarize[work_order]
    boxes, flips = boxes[work_order], flips[work_order]
    source_image = source_image[work_order]
    # Blur operators for every blurred crop at once, in work order.
    blur_sigma = sigma[work_order][blur]
    blur_operators = blur_operators_t = blur_band = None
    if blur_sigma.size:
        blur_operators = box_blur.blur_matrices(
            blur_sigma, size, out=_scratch_array("blur", (len(blur_sigma), size, size))
        )
        blur_operators_t = _scratch_array("blur_t", blur_operators.shape)
        np.copyto(blur_operators_t, np.swapaxes(blur_operators, 1, 2))
        blur_band = box_blur.blur_band(blur_sigma)
    blur_index = np.cumsum(blur) - 1  # A blurred crop's row in blur_operators.

    max_chunk = max(1, _CHUNK_PIXELS // (size * size))
    x_buffer = _scratch_array("crops", (min(max_chunk, len(boxes)), 3, size, size))
    crops = np.empty((len(boxes), size, size, 3), np.uint8)  # In the original order.
    for first, last in _chunks(codes, max_chunk):
        x = x_buffer[: last - first]
        chunk_boxes = boxes[first:last]
        rows = _scratch_array("resize_rows", (3 * size * int(chunk_boxes[:, 2].sum()),))
        resize.resize_into(x, images_BxHx3xW, source_image[first:last], chunk_boxes, flips[first:last], rows)
        for start, stop in _runs(codes[first:last]):
            if codes[first + start] != color.NO_JITTER:
                color.jitter_in_place(
                    x[start:stop], order[first + start], factors[first + start : first + stop]
                )
        gray_rows = np.flatnonzero(gray[first:last])
        if gray_rows.size:
            x[gray_rows] = color.luma(x[gray_rows])[:, None]
        for start, stop in _runs(blur[first:last]):
            if blur[first + start]:
                operators = slice(blur_index[first + start], blur_index[first + start] + stop - start)
                box_blur.blur_in_place(
                    x[start:stop], blur_operators[operators], blur_operators_t[operators], blur_band
                )
        solarize_rows = np.flatnonzero(solarize[first:last])
        if solarize_rows.size:
            x[solarize_rows] = color.solarize_in_place(x[solarize_rows])
        # Back to the original order and to (H, W, 3) uint8, one channel at a time: one strided
        # copy each, several times faster than a transpose then a cast.
        original_rows = work_order[first:last]
        for channel in range(3):
            crops[original_rows, :, :, channel] = x[:, channel]
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
