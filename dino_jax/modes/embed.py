"""`launch.py --mode=embed`: final-norm CLS features of image files, through the evaluation's own
feature extraction (`eval.features`)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import numpy as np

from dino_jax.data import pipeline
from dino_jax.data.image_files import ImageFileSource, image_files
from dino_jax.eval.features import extract_features, make_feature_fn
from dino_jax.interop.load import load_checkpoint
from dino_jax.modes.paths import check_output_file


def run(
    checkpoint: str,
    image_paths: str | Sequence[str],
    out_npz: str,
    *,
    batch_size: int = 64,
    network: str = "teacher",
) -> dict[str, np.ndarray]:
    """Final-norm CLS features of `network`'s backbone for each image file (folders: their image
    files), resized to the model's resolution, written to `out_npz` as `features` (N, D) float32
    and `paths` (N,) str; also returned. One host.

    Pixels are normalised with the statistics the checkpoint was trained with (ImageNet's for
    PyTorch checkpoints, as in the reference; the run's config for a dino_jax workdir).
    """
    # Every input and output checked before the checkpoint is read.
    check_output_file(out_npz, "the embeddings")
    files = image_files(image_paths)
    loaded = load_checkpoint(checkpoint)
    graphdef, params = loaded.backbone(network)
    # Every batch padded to one shape (one compilation), no larger than the files need, and
    # divisible by the devices (of every process) the global batch is split over.
    devices = jax.device_count()
    batch_size = -(-min(batch_size, len(files)) // devices) * devices
    size = loaded.vit_config.image_size
    batches = pipeline.eval_batches(ImageFileSource(files, size), batch_size=batch_size, image_size=size)
    features, _ = extract_features(
        make_feature_fn(graphdef, mean=loaded.mean, std=loaded.std), params, batches
    )
    result = {"features": features.astype(np.float32), "paths": np.asarray(files)}
    if jax.process_index() == 0:  # every process computed the features; one writes them
        os.makedirs(os.path.dirname(os.path.abspath(out_npz)), exist_ok=True)
        np.savez(out_npz, **result)
    return result
