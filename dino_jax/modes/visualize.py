"""`launch.py --mode=visualize`: the last block's CLS attention of image files, per head, with the
reference's threshold masks and overlays (`viz.attention.visualize_files`)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from dino_jax.data.image_files import image_files
from dino_jax.interop.load import load_checkpoint
from dino_jax.modes.paths import check_output_folder
from dino_jax.viz import attention


def run(
    checkpoint: str,
    image_paths: str | Sequence[str],
    out_dir: str,
    *,
    image_size: int | None = None,
    threshold: float | None = attention.DEFAULT_THRESHOLD,
) -> dict[str, list[str]]:
    """Writes the maps of each image file (folders: their image files) into `out_dir`; returns
    `{image path: written paths}` plus `"grid"`."""
    # Every input and output checked before the checkpoint is read.
    check_output_folder(out_dir, "the attention maps")
    files = image_files(image_paths)
    loaded = load_checkpoint(checkpoint)
    graphdef, params = loaded.backbone()
    patch_size = loaded.vit_config.patch_size
    attention_fn = attention.make_cls_attention_fn(
        graphdef, patch_size=patch_size, mean=loaded.mean, std=loaded.std
    )
    written = attention.visualize_files(
        attention_fn,
        params,
        files,
        out_dir,
        patch_size=patch_size,
        image_size=image_size,
        threshold=threshold,
        log=lambda message: print(message, file=sys.stderr, flush=True),
    )
    print(f"wrote attention maps of {len(files)} image(s) into {out_dir}", file=sys.stderr, flush=True)
    return written
