"""Evaluation of a backbone, wired from a config: which datasets, which evaluators, which test
images. Used at the end of training and by `launch.py --mode=eval` (dino_jax/modes/eval.py).

The evaluators themselves (dino_jax/eval, dino_jax/viz) never see a config or a train state; this
module is the adapter between the two.
"""

from __future__ import annotations

import sys
from typing import Sequence

import ml_collections
import numpy as np

from dino_jax.data import pipeline, sources
from dino_jax.eval import suite


def _print(*args):
    print(*args, file=sys.stderr, flush=True)


def suite_settings(config: ml_collections.ConfigDict, *, knn_only: bool = False) -> suite.SuiteSettings:
    e = config.eval
    return suite.SuiteSettings(
        evaluators=("knn",) if knn_only else tuple(e.evaluators),
        transfer_evaluators=tuple(e.transfer_evaluators),
        knn_ks=tuple(e.knn_ks),
        knn_temperature=e.knn_temperature,
        linear_n_last_blocks=e.linear_n_last_blocks,
        linear_epochs=e.linear_epochs,
        linear_batch_size=e.linear_batch_size,
        linear_base_lr=e.linear_base_lr,
        linear_augment=e.linear_augment,
        fewshot_k_shot=e.fewshot_k_shot,
        fewshot_n_query=e.fewshot_n_query,
        fewshot_episodes=e.fewshot_episodes,
        seed=config.seed,
    )


def eval_data(name: str, config: ml_collections.ConfigDict, image_size: int) -> suite.EvalData:
    """A dataset's train and eval splits as re-iterable batch streams at `image_size` pixels.

    Raises DatasetUnavailableError (before any compute) when the dataset is missing.
    """
    spec = sources.DATASETS[name]
    where = dict(data_dir=config.dataset.data_dir or None, synthetic=config.dataset.synthetic)
    train = sources.open_split(name, spec.train_split, **where)
    test = sources.open_split(name, spec.eval_split, **where)
    batch_size = config.eval.batch_size
    return suite.EvalData(
        name=name,
        num_classes=spec.num_classes,
        train_batches=lambda: pipeline.eval_batches(train, batch_size=batch_size, image_size=image_size),
        test_batches=lambda: pipeline.eval_batches(test, batch_size=batch_size, image_size=image_size),
        augmented_train_batches=lambda seed, epoch: pipeline.linear_probe_batches(
            train, batch_size=batch_size, image_size=image_size, seed=seed, epoch=epoch
        ),
    )


def transfer_data(config: ml_collections.ConfigDict, image_size: int) -> list[suite.EvalData]:
    """The configured transfer datasets that are available; a missing one is skipped with a note,
    so a finished training run is never lost to a missing evaluation dataset."""
    available = []
    for name in config.eval.transfer:
        if name == config.dataset.name:
            continue
        try:
            available.append(eval_data(name, config, image_size))
        except sources.DatasetUnavailableError as error:
            _print(f"note: skipping the {name} transfer evaluation: {error}")
    return available


def evaluate(
    config: ml_collections.ConfigDict,
    graphdef,
    params,
    *,
    out_dir: str,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    mesh=None,
    command: str | None = None,
) -> dict[str, float]:
    """The whole configured suite on the config's dataset and its transfer datasets; writes
    `out_dir/results.json` (merged) and `out_dir/results.md`. `graphdef/params`: a ViT backbone."""
    main = eval_data(config.dataset.name, config, image_size)
    return suite.run(
        graphdef,
        params,
        main,
        transfer_data(config, image_size),
        out_dir=out_dir,
        mean=mean,
        std=std,
        settings=suite_settings(config),
        command=command,
        mesh=mesh,
        log=_print,
    )


def knn_only(config, graphdef, params, *, image_size: int, mean, std, mesh=None) -> dict[str, float]:
    """kNN on the config's dataset, nothing written (the random-init baseline)."""
    main = eval_data(config.dataset.name, config, image_size)
    results, _ = suite.evaluate_backbone(
        graphdef, params, main, mean=mean, std=std, settings=suite_settings(config, knn_only=True), mesh=mesh
    )
    return {k: v for k, v in results.items() if k.startswith("knn_")}


def test_panel_images(config: ml_collections.ConfigDict, count: int = 8) -> np.ndarray:
    """A fixed set of test images (the first `count`) for the attention panel logged in training."""
    spec = sources.DATASETS[config.dataset.name]
    source = sources.open_split(
        config.dataset.name,
        spec.eval_split,
        data_dir=config.dataset.data_dir or None,
        synthetic=config.dataset.synthetic,
    )
    batch = next(
        iter(
            pipeline.eval_batches(
                source, batch_size=min(count, len(source)), image_size=config.augment.global_crop_size
            )
        )
    )
    return batch["image"]
