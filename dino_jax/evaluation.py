"""The evaluation jobs, wired from a config: which datasets (the run's and its transfer datasets),
which protocol (`config.suite_settings`), which test images. This is the config side; the evaluators
and their orchestration (`dino_jax/eval/`) never see a config or a train state.

Two jobs, one entry point each:
- `evaluate`: the whole suite on a backbone, written as the report (`results.json`, `results.md`);
  run at the end of training and by `launch.py --mode=eval`.
- `knn`: weighted kNN on the run's dataset, nothing written; the untrained network's baseline, the
  checkpoints of `bench/knn_curve.py`, and, on the fixed subsets of `monitor_data`, the kNN
  monitor of training (`hooks.monitors.KnnMonitor`).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import NamedTuple, Sequence

import jax
import ml_collections
import numpy as np

from dino_jax import config as config_lib
from dino_jax.data import image_folder, pipeline, sources
from dino_jax.eval import features as features_lib, report, suite


def _print(*args):
    print(*args, file=sys.stderr, flush=True)


def eval_data(
    name: str,
    config: ml_collections.ConfigDict,
    image_size: int,
    *,
    max_train: int | None = None,
    max_test: int | None = None,
) -> suite.EvalData:
    """A dataset's train and eval splits as re-iterable batch streams at `image_size` pixels; with
    `max_train`/`max_test`, that many fixed images of the split (`_fixed_subset`), read once.

    Raises DatasetUnavailableError (before any compute) when the dataset is missing.
    """
    # A global batch, split over every device of every host, as config.train.batch_size is.
    config_lib.check_divisible(config.eval.batch_size, jax.device_count(), "config.eval.batch_size")
    train = config_lib.open_split(config, "train", name)
    test = config_lib.open_split(config, "eval", name)
    if max_train is not None:
        train = _fixed_subset(train, max_train)
    if max_test is not None:
        test = _fixed_subset(test, max_test)
    batch_size = config.eval.batch_size
    return suite.EvalData(
        name=name,
        num_classes=config_lib.num_classes(config, name),
        train_batches=lambda: pipeline.eval_batches(train, batch_size=batch_size, image_size=image_size),
        test_batches=lambda: pipeline.eval_batches(test, batch_size=batch_size, image_size=image_size),
        augmented_train_batches=lambda seed, epoch: pipeline.linear_probe_batches(
            train, batch_size=batch_size, image_size=image_size, seed=seed, epoch=epoch
        ),
    )


def unlabelled_reason(config: ml_collections.ConfigDict) -> str | None:
    """Why kNN, the linear probe and few-shot cannot run on the run's own dataset, or None when
    they can. They need labelled train and test splits: a folder dataset (`dataset.name="folder"`)
    without class subfolders, or without a `dataset.test_dir`, has none. Reads no image."""
    d = config.dataset
    if d.name != image_folder.FOLDER:
        return None
    if not image_folder.class_names(d.train_dir):
        return f"the folder {d.train_dir} has no class subfolders (it is unlabelled)"
    if not d.test_dir:
        return "config.dataset.test_dir is empty (no test folder)"
    if not image_folder.class_names(d.test_dir):
        return f"the test folder {d.test_dir} has no class subfolders (it is unlabelled)"
    return None


def unlabelled_note(reason: str, *, training: bool) -> str:
    """The one line a run (`training`) or `--mode=eval` prints when the data cannot be evaluated
    (`unlabelled_reason`)."""
    skipped = "kNN monitor, untrained kNN baseline, kNN, linear probe or few-shot" if training else (
        "kNN, linear probe or few-shot"
    )
    return (
        f"note: no {skipped} on this run's data: {reason}. They need labelled folders: class "
        "subfolders in dataset.train_dir and a dataset.test_dir of the same classes. "
        + ("Training runs as usual; " if training else "")
        + "transfer datasets (eval.transfer) are still evaluated."
    )


def _same_evaluation_data(name: str, other: str) -> bool:
    """Whether two named datasets are evaluated on the same splits (stl10 and stl10_unlabelled)."""
    spec, other_spec = sources.DATASETS.get(name), sources.DATASETS.get(other)
    if spec is None or other_spec is None:
        return name == other
    return (spec.tfds_name, spec.train_split, spec.eval_split) == (
        other_spec.tfds_name,
        other_spec.train_split,
        other_spec.eval_split,
    )


def transfer_data(config: ml_collections.ConfigDict, image_size: int) -> list[suite.EvalData]:
    """The configured transfer datasets that are available; a missing one is skipped with a note,
    so a finished training run is never lost to a missing evaluation dataset."""
    available = []
    for name in config.eval.transfer:
        if _same_evaluation_data(name, config.dataset.name):
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
    """The whole configured suite on the config's dataset and its transfer datasets; merges the
    metrics into `out_dir/results.json` and writes the tables as `out_dir/results.md` (headed by
    `command`, default this process's command line). `graphdef/params`: a ViT backbone. A dataset
    that cannot be evaluated (`unlabelled_reason`) is left out, and results.md says why."""
    reason = unlabelled_reason(config)
    main = None if reason else eval_data(config.dataset.name, config, image_size)
    transfer = transfer_data(config, image_size)
    settings = config_lib.suite_settings(config)
    results = {}
    if main or transfer:
        results, _ = suite.evaluate_backbone(
            graphdef, params, main, transfer, mean=mean, std=std, settings=settings, mesh=mesh, log=_print
        )
    markdown = report.results_markdown(
        results,
        main_name=config.dataset.name,
        transfer_names=[data.name for data in transfer],
        settings=settings,
        command=command,
        main_note=reason and f"Not evaluated: {reason}.",
    )
    json_path, md_path = report.write_results(out_dir, results, markdown)
    if jax.process_index() == 0:  # the one process that wrote them
        _print(f"wrote {json_path} and {md_path}")
    return results


def knn(
    config,
    graphdef,
    params,
    *,
    image_size: int,
    mean,
    std,
    mesh=None,
    data: suite.EvalData | None = None,
    ks: Sequence[int] | None = None,
) -> dict[str, float]:
    """`knn_k{k}_top{1,5}` (the config's temperature; `ks` default the config's) on `data`, default
    the config's dataset, whole; nothing written."""
    main = data or eval_data(config.dataset.name, config, image_size)
    settings = dataclasses.replace(
        config_lib.suite_settings(config),
        evaluators=("knn",),
        knn_ks=tuple(config.eval.knn_ks if ks is None else ks),
    )
    results, _ = suite.evaluate_backbone(
        graphdef, params, main, mean=mean, std=std, settings=settings, mesh=mesh
    )
    return {k: v for k, v in results.items() if k.startswith("knn_")}


class MonitorData(NamedTuple):
    """The kNN monitor's fixed subsets, in memory: `data` as `knn` takes it, and their sizes."""

    data: suite.EvalData
    num_train: int
    num_test: int


# The subsets do not depend on the run's seed, so runs of one dataset are measured on the same images.
_MONITOR_SUBSET_SEED = 0


def _fixed_subset(source, count: int) -> list[dict]:
    """`count` examples of `source` (all of them if it has no more) drawn once with a fixed seed,
    in index order, read into memory."""
    if count >= len(source):
        indices = list(range(len(source)))
    else:
        rng = np.random.default_rng(_MONITOR_SUBSET_SEED)
        indices = sorted(int(i) for i in rng.choice(len(source), count, replace=False))
    if hasattr(source, "__getitems__"):
        return list(source.__getitems__(indices))
    return [source[i] for i in indices]


def monitor_data(config: ml_collections.ConfigDict, image_size: int) -> MonitorData:
    """`eval.monitor_train_images` / `eval.monitor_test_images` fixed images of the run's train and
    test splits, read once: what the kNN monitor and the report's feature map look at."""
    e = config.eval
    data = eval_data(
        config.dataset.name,
        config,
        image_size,
        max_train=e.monitor_train_images,
        max_test=e.monitor_test_images,
    )
    num_train, num_test = (len(config_lib.open_split(config, split)) for split in ("train", "eval"))
    return MonitorData(data, min(num_train, e.monitor_train_images), min(num_test, e.monitor_test_images))


def test_features(
    config: ml_collections.ConfigDict, graphdef, params, *, image_size: int, mean, std, mesh=None
) -> tuple[np.ndarray, np.ndarray]:
    """`(features (N, D), labels (N,))`: the final-norm CLS of the kNN monitor's fixed test images
    (`eval.monitor_test_images` of them), for the report's feature maps. DatasetUnavailableError
    when the run's data has no labelled train and test splits (`unlabelled_reason`)."""
    reason = unlabelled_reason(config)
    if reason:
        raise sources.DatasetUnavailableError(reason)
    test = _fixed_subset(config_lib.open_split(config, "eval"), config.eval.monitor_test_images)
    batches = pipeline.eval_batches(test, batch_size=config.eval.batch_size, image_size=image_size)
    feature_fn = features_lib.make_feature_fn(graphdef, mean=mean, std=std)
    return features_lib.extract_features(feature_fn, params, batches, mesh=mesh)


def test_panel_images(config: ml_collections.ConfigDict, count: int = 8) -> np.ndarray:
    """A fixed set of test images (the first `count`) for the attention panel logged in training;
    the first training images for a folder dataset without a test folder."""
    try:
        source = config_lib.open_split(config, "eval")
    except sources.DatasetUnavailableError:
        if config.dataset.name != image_folder.FOLDER:
            raise
        source = config_lib.open_split(config, "train")
    # The same images in every process: they all compute the panel (hooks.monitors.AttentionPanel).
    batches = pipeline.eval_batches(
        source,
        batch_size=min(count, len(source)),
        image_size=config.augment.global_crop_size,
        shard_index=0,
        shard_count=1,
    )
    return next(iter(batches))["image"]
