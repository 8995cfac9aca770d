"""`launch.py --mode=report`: `report.html` and its figures for a training workdir, finished or
still training (`dino_jax/viz/run_report.py` draws them; this gathers what they need)."""

from __future__ import annotations

import os
import sys

import jax
import ml_collections

from dino_jax import checkpointing, evaluation
from dino_jax import config as config_lib
from dino_jax.data import sources
from dino_jax.modes.paths import check_output_folder
from dino_jax.viz import run_report


def _print(*args):
    print(*args, file=sys.stderr, flush=True)


def run(
    workdir: str,
    *,
    config: ml_collections.ConfigDict | None = None,
    backbone: tuple | None = None,
    step: int | None = None,
    mesh=None,
) -> str | None:
    """Writes `<workdir>/report.html` and `<workdir>/report/*.png`; returns the page's path (None in
    processes other than 0 of a multi-process run, which only help compute the features).

    `config` defaults to the workdir's `config.json`. The feature maps use `backbone` (a ViT
    `(graphdef, params)` trained with the config's pixel statistics, at `step`), else the teacher
    of the workdir's latest checkpoint; without either (a run before its first checkpoint), or
    without the dataset, the page says so and has no map.
    """
    if config is None:
        config = config_lib.load_run_config(workdir)
    check_output_folder(workdir, "the report")
    notes = []
    mean, std = tuple(config.dataset.mean), tuple(config.dataset.std)
    if backbone is None:
        from dino_jax.interop.load import load_checkpoint

        try:
            loaded = load_checkpoint(workdir)
        except checkpointing.CheckpointError as error:
            notes.append(f"No feature map: {error}.")
        else:
            backbone, step, mean, std = loaded.backbone(), loaded.step, loaded.mean, loaded.std
    feature_map = None
    if backbone is not None:
        graphdef, params = backbone
        try:
            features, labels = evaluation.test_features(
                config,
                graphdef,
                params,
                image_size=config.augment.global_crop_size,
                mean=mean,
                std=std,
                mesh=mesh,
            )
        except sources.DatasetUnavailableError as error:
            notes.append(f"No feature map: {error}")
        else:
            where = f" at step {step}" if step is not None else ""
            feature_map = run_report.FeatureMap(
                features,
                labels,
                config_lib.num_classes(config),
                what=f"the teacher's final-norm CLS features{where} of {len(labels)} fixed "
                f"{config.dataset.name} test images",
            )
    if jax.process_index() != 0:  # every process took part in the features; one writes
        return None
    path = run_report.write_report(workdir, config, feature_map=feature_map, notes=notes, log=_print)
    figures = len(os.listdir(os.path.join(workdir, run_report.FIGURES_DIR)))
    _print(f"wrote {path} ({figures} figures in {os.path.join(workdir, run_report.FIGURES_DIR)})")
    return path
