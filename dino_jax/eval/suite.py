"""The evaluation suite: every configured evaluator on a data set and its transfer data sets, one
flat dict of percentages, and the `results.json` / `results.md` files.

It never sees the train state: it gets a backbone `(graphdef, params)` (teacher, student, restored
or converted from PyTorch) and batch iterables, or features already extracted.

Feature use:
- kNN and few-shot read the final-norm CLS token (the reference's kNN feature).
- The linear probe reads the CLS tokens of the last `linear_n_last_blocks` blocks, concatenated
  (the reference's linear feature). The last of those blocks *is* the kNN feature, so one
  extraction pass per split serves all evaluators. With `linear_augment`, the probe instead trains
  on the features of a new RandomResizedCrop + flip view of each train image every epoch (one
  more pass over the train split per epoch, made when the probe asks for it).
- Few-shot episodes come from the evaluation (test) split (REFERENCE.md §6).

Metric names: the main data set's are bare (`knn_k20_top1`, `linear_best_test_top1`,
`fewshot_5shot_ncm`, ...); a transfer data set's carry its name (`stl10_knn_k20_top1`, ...).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import sys
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from flax import nnx

from dino_jax.eval import features as features_lib
from dino_jax.eval import fewshot, knn, linear

Batches = Iterable[Mapping[str, Any]]


@dataclasses.dataclass(frozen=True)
class SuiteSettings:
    """Which evaluators run and with what protocol settings (defaults: the reference's / ours)."""

    evaluators: tuple[str, ...] = ("knn", "linear", "fewshot")
    transfer_evaluators: tuple[str, ...] = ("knn", "linear", "fewshot")
    knn_ks: tuple[int, ...] = (5, 10, 20, 100, 200)
    knn_temperature: float = 0.07
    linear_n_last_blocks: int = 4
    linear_epochs: int = 100
    linear_batch_size: int = 128
    linear_base_lr: float = linear.BASE_LR
    # Non-empty: a sweep over these base rates in one vmapped run, reporting the rate with the best
    # test top-1 (what the paper did; the selection uses the test split, like the reference's
    # best-epoch figure). Empty: `linear_base_lr` alone.
    linear_base_lrs: tuple[float, ...] = ()
    # True: the probe trains on a new RandomResizedCrop + flip view of every train image each
    # epoch (the reference's eval_linear.py), one backbone pass over the train split per epoch;
    # it needs `EvalData.augmented_train_batches`. False: on the cached features of the plain
    # train images (one pass in all).
    linear_augment: bool = False
    fewshot_n_way: int | None = None
    fewshot_k_shot: int = 5
    fewshot_n_query: int = 15
    fewshot_episodes: int = 600
    fewshot_classifiers: tuple[str, ...] = ("ncm", "logreg")
    # Logistic regression costs grow as n_way^2 (100-way: minutes per 600 episodes on a CPU); it is
    # skipped for episodes wider than this.
    fewshot_logreg_max_way: int = 20
    seed: int = 0

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
    """Extracted features of one data set: `cls` is `(N, D)` final-norm CLS, `blocks` is
    `(N, n*D)` CLS of the last n blocks (last block last).

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
    base_lrs = settings.linear_base_lrs or (settings.linear_base_lr,)
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
        results = linear.linear_probe_augmented_sweep(
            lambda epoch: data.augmented_train_blocks(settings.seed, epoch),
            data.test_blocks,
            data.test_labels,
            **protocol,
        )
    else:
        results = linear.linear_probe_sweep(
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
    mesh=None,
) -> SplitFeatures:
    """One pass over each split of `data` with the CLS of the last `n_last_blocks` blocks; the
    final-norm CLS is its last `D` columns. `n_last_blocks` is capped at the model's depth."""
    model = nnx.merge(graphdef, params)
    depth = len(model.blocks)
    embed_dim = model.config.embed_dim
    feature_fn = features_lib.make_feature_fn(
        graphdef, mean=mean, std=std, n_last_blocks=min(n_last_blocks, depth)
    )
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
        train_blocks[:, -embed_dim:],
        train_blocks,
        train_labels,
        test_blocks[:, -embed_dim:],
        test_blocks,
        test_labels,
        augmented_train_blocks,
    )


def evaluate_features(
    main: SplitFeatures,
    transfer: Sequence[SplitFeatures] = (),
    settings: SuiteSettings = SuiteSettings(),
    log: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """Runs `settings.evaluators` on `main` and `settings.transfer_evaluators` on each transfer set.

    Returns the flat metric dict (percent; losses in nats; `*_best_epoch` an epoch number), plus
    `eval_{dataset}_{evaluator}_s` wall times.
    """
    results: dict[str, float] = {}
    for data, names, prefix in [(main, settings.evaluators, "")] + [
        (t, settings.transfer_evaluators, f"{t.name}_") for t in transfer
    ]:
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
    main: EvalData,
    transfer: Sequence[EvalData] = (),
    *,
    mean: Sequence[float],
    std: Sequence[float],
    settings: SuiteSettings = SuiteSettings(),
    mesh=None,
    log: Callable[[str], None] | None = None,
) -> tuple[dict[str, float], list[SplitFeatures]]:
    """Extracts features of every split (one pass each) and runs `evaluate_features`.

    `graphdef, params` are a `VisionTransformer` split with `nnx.split`; `mean`/`std` are the
    normalisation the backbone was trained with (used for transfer images too). Returns the metrics
    and the features (for caching or plots).
    """
    extracted = []
    for data, evaluators in [(main, settings.evaluators)] + [
        (t, settings.transfer_evaluators) for t in transfer
    ]:
        if log:
            log(f"features of {data.name}...")
        started = time.perf_counter()
        # Only the linear probe reads more than the last block.
        n_last_blocks = settings.linear_n_last_blocks if "linear" in evaluators else 1
        extracted.append(
            extract_split_features(
                graphdef, params, data, mean=mean, std=std, n_last_blocks=n_last_blocks, mesh=mesh
            )
        )
        extracted_s = time.perf_counter() - started
        if log:
            log(
                f"features of {data.name}: {len(extracted[-1].train_labels)} train, "
                f"{len(extracted[-1].test_labels)} test in {extracted_s:.1f} s"
            )
    results = evaluate_features(extracted[0], extracted[1:], settings, log)
    if "linear" in settings.evaluators:
        # The count actually used (capped at the depth), for the table heading.
        results["linear_n_last_blocks"] = (
            extracted[0].train_blocks.shape[1] // extracted[0].train_cls.shape[1]
        )
    return results, extracted


def run(
    graphdef,
    params,
    main: EvalData,
    transfer: Sequence[EvalData] = (),
    *,
    out_dir: str,
    mean: Sequence[float],
    std: Sequence[float],
    settings: SuiteSettings = SuiteSettings(),
    command: str | None = None,
    mesh=None,
    log: Callable[[str], None] | None = None,
    title: str | None = None,
) -> dict[str, float]:
    """The whole suite: `evaluate_backbone`, then `out_dir/results.json` (merged with what is
    there) and `out_dir/results.md` (tables headed by `command`, default this process's command
    line). Returns the metrics."""
    results, _ = evaluate_backbone(
        graphdef, params, main, transfer, mean=mean, std=std, settings=settings, mesh=mesh, log=log
    )
    markdown = results_markdown(
        results,
        main_name=main.name,
        transfer_names=[data.name for data in transfer],
        settings=settings,
        command=command,
        title=title,
    )
    json_path, md_path = write_results(out_dir, results, markdown)
    if log:
        log(f"wrote {json_path} and {md_path}")
    return results


# ---------------------------------------------------------------------------------------------
# Reports.


def _pct(results, key) -> str:
    return f"{results[key]:.2f}" if key in results else "-"


def _ci(results, key) -> str:
    if key not in results:
        return "-"
    return f"{results[key]:.2f} ± {results[key + '_ci95']:.2f}"


def results_markdown(
    results: Mapping[str, float],
    *,
    main_name: str,
    transfer_names: Sequence[str] = (),
    settings: SuiteSettings = SuiteSettings(),
    command: str | None = None,
    title: str | None = None,
) -> str:
    """Markdown tables of `results` (as `evaluate_*` returns them), each headed by `command`."""
    command = command if command is not None else default_command()
    heading = f"Command: `{command}`\n"
    lines = [f"# {title or 'Evaluation results'}", ""]
    k_shot = settings.fewshot_k_shot
    n_blocks = int(results.get("linear_n_last_blocks", settings.linear_n_last_blocks))
    base_lr = results.get("linear_base_lr", settings.linear_base_lr)
    linear_setup = (
        f"CLS of the last {n_blocks} blocks, "
        f"{settings.linear_epochs} epochs, batch {settings.linear_batch_size}, "
        f"lr {linear.scaled_learning_rate(settings.linear_batch_size, base_lr):g}"
    )
    if settings.linear_augment:
        linear_setup += ", trained on a RandomResizedCrop + flip view of each image per epoch"
    if settings.linear_base_lrs:
        linear_setup += (
            f", best of base rates {list(settings.linear_base_lrs)} per 256 (chosen on test top-1)"
        )

    lines += [f"## {main_name}", ""]
    if "linear_test_top1" in results:
        lines += [
            f"### Linear probe ({linear_setup})",
            "",
            heading,
            "| train top-1 | train loss | test top-1 (final) | test top-1 (best, epoch) | "
            "test top-5 | test loss |",
            "|---|---|---|---|---|---|",
            f"| {_pct(results, 'linear_train_top1')} | {results['linear_train_loss']:.4f} | "
            f"{_pct(results, 'linear_test_top1')} | {_pct(results, 'linear_best_test_top1')} "
            f"({int(results['linear_best_epoch'])}) | {_pct(results, 'linear_test_top5')} | "
            f"{results['linear_test_loss']:.4f} |",
            "",
        ]
    ks = [k for k in settings.knn_ks if f"knn_k{k}_top1" in results]
    if ks:
        lines += [
            f"### Weighted kNN (T = {settings.knn_temperature:g}, final-norm CLS)",
            "",
            heading,
            "| k | top-1 | top-5 |",
            "|---|---|---|",
        ]
        lines += [
            f"| {k} | {_pct(results, f'knn_k{k}_top1')} | {_pct(results, f'knn_k{k}_top5')} |" for k in ks
        ]
        skipped = [k for k in settings.knn_ks if k not in ks]
        if skipped and "knn" in settings.evaluators:
            lines += ["", f"k = {skipped} not computed: larger than the training set."]
        lines.append("")
    shot_names = [name for name in fewshot.CLASSIFIERS if f"fewshot_{k_shot}shot_{name}" in results]
    if shot_names:
        lines += [
            f"### Few-shot ({k_shot}-shot, {settings.fewshot_n_query} queries per class, "
            f"{settings.fewshot_episodes} episodes, mean ± 95% CI)",
            "",
            heading,
            "| classifier | accuracy |",
            "|---|---|",
        ]
        lines += [f"| {name} | {_ci(results, f'fewshot_{k_shot}shot_{name}')} |" for name in shot_names]
        lines.append("")

    if transfer_names:
        knn_k = 20 if 20 in settings.knn_ks else settings.knn_ks[0]
        lines += [
            f"## Transfer (features of the backbone trained on {main_name})",
            "",
            heading,
            f"| dataset | kNN k={knn_k} top-1 | linear top-1 (best) | linear top-1 (final) | "
            f"{k_shot}-shot NCM | {k_shot}-shot logreg |",
            "|---|---|---|---|---|---|",
        ]
        for name in transfer_names:
            lines.append(
                f"| {name} | {_pct(results, f'{name}_knn_k{knn_k}_top1')} | "
                f"{_pct(results, f'{name}_linear_best_test_top1')} | "
                f"{_pct(results, f'{name}_linear_test_top1')} | "
                f"{_ci(results, f'{name}_fewshot_{k_shot}shot_ncm')} | "
                f"{_ci(results, f'{name}_fewshot_{k_shot}shot_logreg')} |"
            )
        lines.append("")
    return "\n".join(lines)


def default_command() -> str:
    """The command line of this process, shell-quoted."""
    return " ".join(["python"] + [shlex.quote(arg) for arg in sys.argv])


def write_results(
    out_dir: str, results: Mapping[str, float], markdown: str, *, merge: bool = True
) -> tuple[str, str]:
    """Writes `results.json` (merged into an existing one unless `merge=False`: training metrics
    written there before survive) and `results.md`; returns both paths. Writes are atomic."""
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, "results.json")
    payload: dict[str, float] = {}
    if merge and os.path.exists(json_path):
        with open(json_path) as f:
            payload = json.load(f)
    payload.update({key: float(value) for key, value in results.items()})
    md_path = os.path.join(out_dir, "results.md")
    for path, text in ((json_path, json.dumps(payload, indent=2, sort_keys=True)), (md_path, markdown)):
        with open(path + ".tmp", "w") as f:
            f.write(text + "\n")
        os.replace(path + ".tmp", path)
    return json_path, md_path
