"""`launch.py --mode=eval`: the configured evaluation suite on any checkpoint's teacher backbone."""

from __future__ import annotations

import os
import sys

import ml_collections

from dino_jax import config as config_lib, config_validation, evaluation
from dino_jax.interop.load import load_checkpoint
from dino_jax.modes.paths import check_output_folder


def config_for(checkpoint: str, config: ml_collections.ConfigDict | None) -> ml_collections.ConfigDict:
    """`config` if given, else the config of the training workdir `checkpoint`."""
    if config is not None:
        return config
    if os.path.isdir(checkpoint) and config_lib.has_run_config(checkpoint):
        return config_lib.load_run_config(checkpoint)
    raise config_lib.ConfigError(
        f"--mode=eval of {checkpoint} needs --config (which dataset and evaluators to use)"
    )


def run(config: ml_collections.ConfigDict | None, checkpoint: str, out_dir: str) -> dict[str, float]:
    """Evaluates a training workdir's latest teacher, a converted checkpoint or a PyTorch file
    with `config` (default: the workdir's own); writes `out_dir/results.json` and `results.md`."""
    config = config_for(checkpoint, config)
    config_validation.validate(config)
    check_output_folder(out_dir, "the results")
    loaded = load_checkpoint(checkpoint)
    graphdef, params = loaded.backbone()
    vit_config = loaded.vit_config
    where = f" (step {loaded.step})" if loaded.step is not None else ""
    print(
        f"evaluating the teacher of {checkpoint}{where}: ViT {vit_config.embed_dim}-d x {vit_config.depth}, "
        f"patch {vit_config.patch_size}, {vit_config.image_size} px",
        file=sys.stderr,
        flush=True,
    )
    reason = evaluation.unlabelled_reason(config)
    if reason:
        print(evaluation.unlabelled_note(reason, training=False), file=sys.stderr, flush=True)
    return evaluation.evaluate(
        config,
        graphdef,
        params,
        out_dir=out_dir,
        image_size=vit_config.image_size,
        mean=loaded.mean,
        std=loaded.std,
    )
