"""Attention maps of the last block: what the CLS token looks at, per head (the reference's
`visualize_attention.py`), as arrays, PNG files and matplotlib figures.

- `make_cls_attention_fn` gives a jitted `fn(params, images_uint8) -> (B, heads, h, w)`: row 0
  (the CLS query) of the last block's softmax attention over the patch keys, on the patch grid.
- `threshold_masks` is the reference's mask: per head, the smallest set of patches that together
  hold at least `threshold` of the CLS attention (sort ascending, renormalise, cumulative sum, keep
  where the sum exceeds `1 - threshold`, restore the order).
- Maps and masks are upsampled to pixels by repeating each patch `patch_size` times (nearest).
- `save_attention_images` writes, per image, `attn-head{j}.png` (default colormap, like the
  reference), `attn-mean.png`, `mask_th{t}_head{j}.png` overlays, `mask_th{t}_mean.png`, and
  `overlay-mean.png` (the mean map over the image); `attention_grid_figure` lays several images
  out in one figure. Overlays colour the mask at alpha 0.5 and outline it with a contour.

Everything uses matplotlib's object API with the Agg canvas: no pyplot state, no display needed.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import matplotlib
import matplotlib.image
import numpy as np
from flax import nnx
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dino_jax.data.image_files import ImageFileError, check_image_file, load_image
from dino_jax.data.normalize import IMAGENET_MEAN, IMAGENET_STD, normalize_images

DEFAULT_THRESHOLD = 0.6
# Attention is computed on at most this many patches (its cost grows with their square): a larger
# image is scaled down to fit. The reference's default input, 480 x 480 at patch 8, is 3600.
MAX_PATCHES = 4096
# Fixed per-head colours (deterministic figures; the reference draws random ones).
_HEAD_COLOURS = [matplotlib.colors.to_rgb(c) for c in matplotlib.colormaps["tab10"].colors]


def make_cls_attention_fn(
    graphdef, *, patch_size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
):
    """Jitted `fn(params, images_uint8_BxHxWxC) -> float32 (B, heads, H/p, W/p)`.

    H and W must be multiples of `patch_size` (see `crop_to_patch_multiple`); sizes other than the
    model's training size use its interpolated position embedding. Each head's map sums to
    `1 - attention(CLS -> CLS)`: the mass the CLS token puts on patches.
    """

    @jax.jit
    def cls_attention_fn(params, images_uint8_BxHxWxC):
        batch, height, width, _ = images_uint8_BxHxWxC.shape
        if height % patch_size or width % patch_size:
            raise ValueError(
                f"images of {height}x{width} pixels are not a multiple of the patch size "
                f"{patch_size}; crop them with crop_to_patch_multiple"
            )
        model = nnx.merge(graphdef, params)
        attention_BxHxTxT = model.last_self_attention(normalize_images(images_uint8_BxHxWxC, mean, std))
        heads = attention_BxHxTxT.shape[1]
        return (
            attention_BxHxTxT[:, :, 0, 1:]
            .reshape(batch, heads, height // patch_size, width // patch_size)
            .astype(jnp.float32)
        )

    return cls_attention_fn


def crop_to_patch_multiple(image_HxWxC: np.ndarray, patch_size: int, name: str = "image") -> np.ndarray:
    """Top-left crop to the largest multiple of `patch_size` in each dimension (the reference's);
    ImageFileError naming `name` (the image's file) if a side is shorter than a patch."""
    height = image_HxWxC.shape[0] - image_HxWxC.shape[0] % patch_size
    width = image_HxWxC.shape[1] - image_HxWxC.shape[1] % patch_size
    if height == 0 or width == 0:
        raise ImageFileError(
            f"{name}: {image_HxWxC.shape[1]} x {image_HxWxC.shape[0]} pixels, smaller than one "
            f"{patch_size}-pixel patch"
        )
    return image_HxWxC[:height, :width]


def threshold_masks(attention, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """Boolean masks, same shape as `attention` (`(..., h, w)` or `(..., P)`), keeping per map the
    highest-attention entries whose renormalised mass first exceeds `threshold`.

    The kept mass is always >= `threshold` of the map's total (everything dropped sits at cumulative
    mass <= `1 - threshold`). Maps are the trailing two axes when `attention.ndim >= 3`, else the
    last axis.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold={threshold}; expected a mass fraction in (0, 1]")
    attention = np.asarray(attention, np.float64)
    map_shape = attention.shape[-2:] if attention.ndim >= 3 else attention.shape[-1:]
    flat = attention.reshape(attention.shape[: attention.ndim - len(map_shape)] + (-1,))
    order = np.argsort(flat, axis=-1, kind="stable")
    ascending = np.take_along_axis(flat, order, axis=-1)
    cumulative = np.cumsum(ascending / ascending.sum(axis=-1, keepdims=True), axis=-1)
    keep_sorted = cumulative > 1.0 - threshold
    keep = np.empty_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, axis=-1)
    return keep.reshape(attention.shape)


def upsample_nearest(maps_xHxW: np.ndarray, factor: int) -> np.ndarray:
    """Repeats each of the last two axes `factor` times (a patch map -> pixels)."""
    return np.repeat(np.repeat(np.asarray(maps_xHxW), factor, axis=-2), factor, axis=-1)


def _mask_overlay(axes, image_HxWx3, masks_KxHxW, colours, alpha: float = 0.5) -> None:
    """Draws the image with each mask filled in its colour at `alpha` and outlined."""
    composite = image_HxWx3.astype(np.float64) / 255.0
    for mask, colour in zip(masks_KxHxW, colours):
        composite = np.where(mask[..., None], (1 - alpha) * composite + alpha * np.array(colour), composite)
    axes.imshow(composite, interpolation="nearest")
    for mask, colour in zip(masks_KxHxW, colours):
        if mask.any() and not mask.all():
            # Padding closes contours that touch the border.
            padded = np.pad(mask.astype(np.float64), 1)
            axes.contour(
                np.arange(-1, mask.shape[1] + 1),
                np.arange(-1, mask.shape[0] + 1),
                padded,
                levels=[0.5],
                colors=[colour],
                linewidths=1.0,
            )
    axes.set_xlim(-0.5, mask.shape[1] - 0.5)
    axes.set_ylim(mask.shape[0] - 0.5, -0.5)
    axes.set_axis_off()


def agg_figure(width_in: float, height_in: float) -> Figure:
    """A matplotlib figure on the Agg canvas (no pyplot state, no display)."""
    figure = Figure(figsize=(width_in, height_in))
    FigureCanvasAgg(figure)
    return figure


def _save_overlay(path: str, image_HxWx3, masks_KxHxW, colours) -> None:
    height, width = image_HxWx3.shape[:2]
    figure = agg_figure(max(2.0, width / 64), max(2.0, height / 64))
    axes = figure.add_axes((0, 0, 1, 1))
    _mask_overlay(axes, image_HxWx3, masks_KxHxW, colours)
    figure.savefig(path, dpi=100)


def save_attention_images(
    out_dir: str,
    image_HxWx3: np.ndarray,
    cls_attention_Hxhxw: np.ndarray,
    *,
    patch_size: int,
    threshold: float | None = DEFAULT_THRESHOLD,
) -> list[str]:
    """Writes the per-head maps, mean map, masks and overlays of one image; returns the paths.

    `image_HxWx3` is the uint8 image the attention was computed on (already cropped to a multiple
    of `patch_size`); `cls_attention_Hxhxw` is one row of `make_cls_attention_fn`'s output.
    `threshold=None` skips the masks.
    """
    os.makedirs(out_dir, exist_ok=True)
    attention = np.asarray(cls_attention_Hxhxw, np.float64)
    maps = upsample_nearest(np.concatenate([attention, attention.mean(0, keepdims=True)]), patch_size)
    names = [f"head{j}" for j in range(len(attention))] + ["mean"]
    paths = [os.path.join(out_dir, "img.png")]
    matplotlib.image.imsave(paths[0], image_HxWx3)
    for name, attention_map in zip(names, maps):
        paths.append(os.path.join(out_dir, f"attn-{name}.png"))
        matplotlib.image.imsave(paths[-1], attention_map)
    paths.append(os.path.join(out_dir, "overlay-mean.png"))
    figure = agg_figure(max(2.0, image_HxWx3.shape[1] / 64), max(2.0, image_HxWx3.shape[0] / 64))
    axes = figure.add_axes((0, 0, 1, 1))
    axes.imshow(image_HxWx3)
    axes.imshow(maps[-1], cmap="inferno", alpha=0.6)
    axes.set_axis_off()
    figure.savefig(paths[-1], dpi=100)
    if threshold is not None:
        masks = upsample_nearest(
            threshold_masks(np.concatenate([attention, attention.mean(0, keepdims=True)]), threshold),
            patch_size,
        )
        for j, (name, mask) in enumerate(zip(names, masks)):
            paths.append(os.path.join(out_dir, f"mask_th{threshold}_{name}.png"))
            _save_overlay(paths[-1], image_HxWx3, mask[None], [_HEAD_COLOURS[j % len(_HEAD_COLOURS)]])
    return paths


def attention_grid_figure(
    images: Sequence[np.ndarray],
    cls_attentions: Sequence[np.ndarray],
    *,
    patch_size: int,
    threshold: float | None = DEFAULT_THRESHOLD,
    titles: Sequence[str] | None = None,
) -> Figure:
    """One row per image: the image, the mean map, each head's map, and all heads' masks overlaid.

    `images[i]` is uint8 `(H, W, 3)`, `cls_attentions[i]` is `(heads, H/p, W/p)`; images may differ
    in size.
    """
    if len(images) != len(cls_attentions) or not images:
        raise ValueError(
            f"{len(images)} images and {len(cls_attentions)} attention maps; expected "
            "the same non-zero number"
        )
    heads = np.asarray(cls_attentions[0]).shape[0]
    columns = 2 + heads + (threshold is not None)
    figure = agg_figure(1.6 * columns, 1.6 * len(images))
    grid = figure.add_gridspec(len(images), columns, wspace=0.05, hspace=0.15)
    column_titles = ["image", "mean"] + [f"head {j}" for j in range(heads)]
    if threshold is not None:
        column_titles.append(f"masks {threshold:.0%}")
    for row, (image, attention) in enumerate(zip(images, cls_attentions)):
        attention = np.asarray(attention, np.float64)
        maps = upsample_nearest(np.concatenate([attention.mean(0, keepdims=True), attention]), patch_size)
        panels = [figure.add_subplot(grid[row, column]) for column in range(columns)]
        panels[0].imshow(image)
        for panel, attention_map in zip(panels[1:], maps):
            panel.imshow(attention_map, cmap="inferno", interpolation="nearest")
        if threshold is not None:
            masks = upsample_nearest(threshold_masks(attention, threshold), patch_size)
            _mask_overlay(panels[-1], image, masks, _HEAD_COLOURS[:heads])
        for column, panel in enumerate(panels):
            panel.set_axis_off()
            if row == 0:
                panel.set_title(column_titles[column], fontsize=8)
        if titles is not None:
            panels[0].text(
                -0.05,
                0.5,
                titles[row],
                transform=panels[0].transAxes,
                rotation=90,
                ha="right",
                va="center",
                fontsize=7,
            )
    return figure


def figure_to_array(figure: Figure) -> np.ndarray:
    """The rendered figure as uint8 RGB `(H, W, 3)`, e.g. for TensorBoard image summaries."""
    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()


def attention_panel(
    cls_attention_fn,
    params,
    images_BxHxWx3: np.ndarray,
    *,
    patch_size: int,
    threshold: float | None = DEFAULT_THRESHOLD,
) -> np.ndarray:
    """The grid figure of a fixed batch of images as uint8 RGB `(H, W, 3)`: for logging the
    attention of validation images during training (one device call, one figure)."""
    images = np.asarray(images_BxHxWx3)
    attentions = np.asarray(cls_attention_fn(params, images))
    return figure_to_array(
        attention_grid_figure(list(images), list(attentions), patch_size=patch_size, threshold=threshold)
    )


def fit_to_patches(path: str, patch_size: int, max_patches: int = MAX_PATCHES) -> tuple[int, int] | None:
    """`(height, width)` to scale the image file at `path` to so that it holds at most
    `max_patches` patches (aspect ratio kept), or None when it already does."""
    height, width = check_image_file(path)
    if (height // patch_size) * (width // patch_size) <= max_patches:
        return None
    scale = math.sqrt(max_patches * patch_size**2 / (height * width))
    return max(patch_size, int(height * scale)), max(patch_size, int(width * scale))


def visualize_files(
    cls_attention_fn,
    params,
    image_paths: Sequence[str],
    out_dir: str,
    *,
    patch_size: int,
    image_size: int | tuple[int, int] | None = None,
    threshold: float | None = DEFAULT_THRESHOLD,
    max_patches: int = MAX_PATCHES,
    log: Callable[[str], None] = lambda message: None,
) -> dict[str, list[str]]:
    """For each image file: load (resize to `image_size` if given, else scale down an image of more
    than `max_patches` patches, with a `log` note), crop to a multiple of the patch size, compute
    the CLS attention, write `save_attention_images` into `out_dir/<file stem>/`; finally write
    `out_dir/attention_grid.png`. Returns `{image path: written paths}` plus `"grid": [grid path]`.
    """
    if not image_paths:
        raise ValueError("visualize_files: no image paths given; expected at least one")
    written: dict[str, list[str]] = {}
    images, attentions, stems = [], [], []
    for path in image_paths:
        size = image_size or fit_to_patches(path, patch_size, max_patches)
        if image_size is None and size is not None:
            log(
                f"note: {path} holds more than {max_patches} patches of {patch_size} pixels; its "
                f"attention is computed at {size[1]} x {size[0]} pixels"
            )
        image = crop_to_patch_multiple(load_image(path, size), patch_size, name=path)
        attention = np.asarray(cls_attention_fn(params, image[None]))[0]
        stem = os.path.splitext(os.path.basename(path))[0]
        # Two inputs with one stem (a/x.png, b/x.jpg) must not overwrite each other.
        while stem in stems:
            stem += "_"
        written[path] = save_attention_images(
            os.path.join(out_dir, stem), image, attention, patch_size=patch_size, threshold=threshold
        )
        images.append(image)
        attentions.append(attention)
        stems.append(stem)
    grid_path = os.path.join(out_dir, "attention_grid.png")
    attention_grid_figure(
        images, attentions, patch_size=patch_size, threshold=threshold, titles=stems
    ).savefig(grid_path, dpi=120, bbox_inches="tight")
    written["grid"] = [grid_path]
    return written
