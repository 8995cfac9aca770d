"""The evaluation suite: features of every split extracted once, then every evaluator the settings
name on a data set and its transfer data sets, as one flat dict of percentages (the tables and files
are `report.py`'s; which datasets and settings come from a config is `dino_jax/evaluation.py`'s).

It never sees the train state: it gets a backbone `(graphdef, params)` (teacher, student, restored
or converted from PyTorch) and batch iterables, or features already extracted.

Feature use:
- kNN and few-shot read the final-norm CLS token (the reference's kNN feature).
- The linear probe reads the CLS tokens of the last `linear_n_last_blocks` blocks, concatenated
  (the reference's linear feature), or with `linear_avgpool` the last block's CLS and mean patch
  token interleaved. Either holds the kNN feature, so one extraction pass per split serves all
  evaluators. With `linear_augment`, the probe instead trains
  on the features of a new RandomResizedCrop + flip view of each train image every epoch (one
  more pass over the train split per epoch, made when the probe asks for it).
- Few-shot episodes come from the evaluation (test) split (our protocol: docs/reference.md).

Metric names: the main data set's are bare (`knn_k20_top1`, `linear_best_test_top1`,
`fewshot_5shot_ncm`, ...); a transfer data set's carry its name (`stl10_knn_k20_top1`, ...).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from flax import nnx

from dino_jax.eval import features as features_lib
from dino_jax.eval import fewshot, knn, linear

Batches = Iterable[Mapping[str, Any]]


@dataclasses.dataclass(frozen=True)
class SuiteSettings:
    """Which evaluators run and with what protocol; `dino_jax.config.suite_settings` builds it from
    `config.eval` (whose keys in `dino_jax/configs/base.py` say what each field means)."""

    evaluators: tuple[str, ...]
    transfer_evaluators: tuple[str, ...]
    knn_ks: tuple[int, ...]
    knn_temperature: float
    linear_n_last_blocks: int
    linear_avgpool: bool
    linear_epochs: int
    linear_batch_size: int
    # More than one: a sweep in one vmapped run, reporting the rate with the best test top-1.
    linear_base_lrs: tuple[float, ...]
    # True: the probe trains on a new RandomResizedCrop + flip view of every train image each
    # epoch, which needs `EvalData.augmented_train_batches`; False: on cached features.
    linear_augment: bool
    fewshot_n_way: int | None  # None: every class of the split
    fewshot_k_shot: int
    fewshot_n_query: int
    fewshot_episodes: int
    fewshot_classifiers: tuple[str, ...]
    fewshot_logreg_max_way: int  # logistic regression is skipped for wider episodes
    seed: int

    def __post_init__(self):
        for field in ("evaluators", "transfer_evaluators"):
            unknown = [name for name in getattr(self, field) if name not in EVALUATORS]
            if unknown:
                raise ValueError(
                    f"SuiteSettings.{field} has unknown evaluators {unknown}; expected "
                    f"names from {sorted(EVALUATORS)}"
                )


@dataclasses.dataclass(frozen=True)
class EvalData:
    """Where one data set's images come from. The callables return a fresh iterable of batches
    `{"image": uint8, "label", "mask"}` (e.g. `pipeline.eval_batches(...)`) each time.

    `augmented_train_batches(seed, epoch)`, when given, is the train split in the same rows with
    each image as its linear-probe view for that epoch (`pipeline.linear_probe_batches`); only
    `SuiteSettings.linear_augment` reads it.
    """

    name: str
    num_classes: int
    train_batches: Callable[[], Batches]
    test_batches: Callable[[], Batches]
    augmented_train_batches: Callable[[int, int], Batches] | None = None


@dataclasses.dataclass(frozen=True)
class SplitFeatures:
    """Extracted features of one data set: `cls` is `(N, D)` final-norm CLS, `blocks` the linear
    probe's feature: `(N, n*D)` CLS of the last n blocks (last block last), or `(N, 2*D)` CLS and
    mean patch token interleaved (`linear_avgpool`).

    `augmented_train_blocks(seed, epoch)`, when the data set has augmented views, extracts the
    `blocks` features and labels of the train split's views for that epoch (a backbone pass).
    """

    name: str
    num_classes: int
    train_cls: np.ndarray
    train_blocks: np.ndarray
    train_labels: np.ndarray
    test_cls: np.ndarray
    test_blocks: np.ndarray
    test_labels: np.ndarray
    augmented_train_blocks: Callable[[int, int], tuple[np.ndarray, np.ndarray]] | None = None


def _run_knn(data: SplitFeatures, settings: SuiteSettings) -> dict[str, float]:
    # k larger than the train set cannot be computed; those k are left out (and the table says so).
    ks = tuple(k for k in settings.knn_ks if k <= len(data.train_cls))
    if not ks:
        return {}
    return knn.weighted_knn(
        data.train_cls,
        data.train_labels,
        data.test_cls,
        data.test_labels,
        num_classes=data.num_classes,
        ks=ks,
        temperature=settings.knn_temperature,
    )


def _run_linear(data: SplitFeatures, settings: SuiteSettings) -> dict[str, float]:
    base_lrs = settings.linear_base_lrs
    protocol = {
        "num_classes": data.num_classes,
        "epochs": settings.linear_epochs,
        "batch_size": settings.linear_batch_size,
        "base_lrs": base_lrs,
        "seed": settings.seed,
    }
    if settings.linear_augment:
        if data.augmented_train_blocks is None:
            raise ValueError(
                f"SuiteSettings.linear_augment=True, but the {data.name} features have no "
                "augmented train views; expected EvalData.augmented_train_batches (features "
                "extracted by `extract_split_features`)"
            )
        results = linear.linear_probe_augmented(
            lambda epoch: data.augmented_train_blocks(settings.seed, epoch),
            data.test_blocks,
            data.test_labels,
            **protocol,
        )
    else:
        results = linear.linear_probe(
            data.train_blocks, data.train_labels, data.test_blocks, data.test_labels, **protocol
        )
    best = linear.best_of(results)
    metrics = best.metrics("linear")
    metrics["linear_base_lr"] = base_lrs[results.index(best)]
    return metrics


def _run_fewshot(data: SplitFeatures, settings: SuiteSettings) -> dict[str, float]:
    present = len(np.unique(data.test_labels))
    n_way = present if settings.fewshot_n_way is None else settings.fewshot_n_way
    classifiers = tuple(
        name
        for name in settings.fewshot_classifiers
        if name != "logreg" or n_way <= settings.fewshot_logreg_max_way
    )
    if not classifiers:
        return {}
    return fewshot.few_shot(
        data.test_cls,
        data.test_labels,
        n_way=settings.fewshot_n_way,
        k_shot=settings.fewshot_k_shot,
        n_query=settings.fewshot_n_query,
        episodes=settings.fewshot_episodes,
        classifiers=classifiers,
        seed=settings.seed,
    )


EVALUATORS: dict[str, Callable[[SplitFeatures, SuiteSettings], dict[str, float]]] = {
    "knn": _run_knn,
    "linear": _run_linear,
    "fewshot": _run_fewshot,
}


def extract_split_features(
    graphdef,
    params,
    data: EvalData,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    n_last_blocks: int,
    avgpool: bool,
    mesh=None,
) -> SplitFeatures:
    """One pass over each split of `data` with the CLS of the last `n_last_blocks` blocks (capped
    at the model's depth), whose last `D` columns are the final-norm CLS; with `avgpool`, the
    last block's CLS and mean patch token interleaved, whose even columns are the CLS."""
    model = nnx.merge(graphdef, params)
    depth = model.config.depth
    embed_dim = model.config.embed_dim
    feature_fn = features_lib.make_feature_fn(
        graphdef, mean=mean, std=std, n_last_blocks=min(n_last_blocks, depth), avgpool=avgpool
    )

    def cls_of(blocks):
        return blocks[:, 0::2] if avgpool else blocks[:, -embed_dim:]

    train_blocks, train_labels = features_lib.extract_features(
        feature_fn, params, data.train_batches(), mesh=mesh
    )
    test_blocks, test_labels = features_lib.extract_features(
        feature_fn, params, data.test_batches(), mesh=mesh
    )
    augmented_train_blocks = None
    if data.augmented_train_batches is not None:
        augmented_batches = data.augmented_train_batches

        def augmented_train_blocks(seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
            return features_lib.extract_features(
                feature_fn, params, augmented_batches(seed, epoch), mesh=mesh
            )

    return SplitFeatures(
        data.name,
        data.num_classes,
        cls_of(train_blocks),
        train_blocks,
        train_labels,
        cls_of(test_blocks),
        test_blocks,
        test_labels,
        augmented_train_blocks,
    )


def evaluate_features(
    main: SplitFeatures | None,
    transfer: Sequence[SplitFeatures],
    settings: SuiteSettings,
    log: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """Runs `settings.evaluators` on `main` (None: a dataset without labels, left out) and
    `settings.transfer_evaluators` on each transfer set.

    Returns the flat metric dict (percent; losses in nats; `*_best_epoch` an epoch number), plus
    `eval_{dataset}_{evaluator}_s` wall times.
    """
    results: dict[str, float] = {}
    jobs = [(t, settings.transfer_evaluators, f"{t.name}_") for t in transfer]
    if main is not None:
        jobs.insert(0, (main, settings.evaluators, ""))
    for data, names, prefix in jobs:
        for name in names:
            if log:
                log(f"{name} on {data.name}...")
            started = time.perf_counter()
            metrics = EVALUATORS[name](data, settings)
            results.update({prefix + key: value for key, value in metrics.items()})
            results[f"eval_{data.name}_{name}_s"] = time.perf_counter() - started
    return results


def evaluate_backbone(
    graphdef,
    params,
    main: EvalData | None,
    transfer: Sequence[EvalData] = (),
    *,
    mean: Sequence[float],
    std: Sequence[float],
    settings: SuiteSettings,
    mesh=None,
    log: Callable[[str], None] | None = None,
) -> tuple[dict[str, float], list[SplitFeatures]]:
    """Extracts features of every split (one pass each) and runs `evaluate_features`.

    `graphdef, params` are a `VisionTransformer` split with `nnx.split`; `mean`/`std` are the
    normalisation the backbone was trained with (used for transfer images too); `main` None
    evaluates the transfer sets only. Returns the metrics and the features (for caching or plots),
    main's first.
    """
    extracted = []
    jobs = [(t, settings.transfer_evaluators) for t in transfer]
    if main is not None:
        jobs.insert(0, (main, settings.evaluators))
    for data, evaluators in jobs:
        if log:
            log(f"features of {data.name}...")
        started = time.perf_counter()
        # Only the linear probe reads more than the last block's CLS.
        linear_feature = "linear" in evaluators
        extracted.append(
            extract_split_features(
                graphdef,
                params,
                data,
                mean=mean,
                std=std,
                n_last_blocks=settings.linear_n_last_blocks if linear_feature else 1,
                avgpool=settings.linear_avgpool and linear_feature,
                mesh=mesh,
            )
        )
        extracted_s = time.perf_counter() - started
        if log:
            log(
                f"features of {data.name}: {len(extracted[-1].train_labels)} train, "
                f"{len(extracted[-1].test_labels)} test in {extracted_s:.1f} s"
            )
    main_features = extracted[0] if main is not None else None
    transfer_features = extracted[1:] if main is not None else extracted
    results = evaluate_features(main_features, transfer_features, settings, log)
    if "linear" in settings.evaluators and main_features is not None:
        # The count actually used (capped at the depth), for the table heading.
        results["linear_n_last_blocks"] = (
            1
            if settings.linear_avgpool
            else main_features.train_blocks.shape[1] // main_features.train_cls.shape[1]
        )
    return results, extracted
