"""Benchmark of the evaluators against the reference's algorithms written in PyTorch (CPU).

    python -m bench.eval            # full size: ~3-4 minutes on a 2-core CPU
    python -m bench.eval --quick    # small sizes, seconds (a smoke run)

1. Weighted kNN, 50,000 train x 10,000 test x 192-d features (ViT-Tiny CLS), 100 classes,
   k in {5, 10, 20, 100, 200}. Ours: `dino_jax.eval.knn.weighted_knn` (one top-k over the largest
   k per chunk, jitted). Baseline: the reference's `knn_classifier` procedure in torch: 100 test
   chunks, per chunk a similarity matmul, `topk(k)`, a one-hot of the neighbour labels scattered
   into a `(chunk * k, classes)` buffer, exp-weighted sum, full sort of the class scores; run once
   per k, as `eval_knn.py` loops over `--nb_knn`.
2. Linear probe, 100 epochs on 50,000 cached 768-d features (ViT-Tiny, CLS of the last 4 blocks),
   100 classes, batch 128, test pass over 10,000 features after every epoch. Ours:
   `dino_jax.eval.linear.linear_probe` (each epoch one jitted scan over the minibatches). Baseline: the reference's
   training loop on the same tensors in torch: `nn.Linear` N(0, 0.01), SGD momentum 0.9, lr
   0.001 * 128 / 256, `CosineAnnealingLR` stepped per epoch, a fresh random permutation per epoch
   (no DataLoader, which would only slow the baseline down), evaluation every epoch.

Features are random Gaussian clusters, so both implementations' accuracies are printed as a check
that they solve the same problem. Our kNN is timed twice (first call includes compilation); the
linear probe once, compilation included. Torch gets the same number of threads as the machine has
cores. The last line is one JSON object: times in seconds (`_s`), `_speedup` = baseline / ours.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np


def clustered_features(rng, num_classes, dim, count, centres, spread):
    labels = rng.integers(0, num_classes, count)
    features = centres[labels] + spread * rng.standard_normal((count, dim)).astype(np.float32)
    return features.astype(np.float32), labels


def torch_knn(torch, train_x, train_y, test_x, test_y, num_classes, k, temperature):
    """The reference's kNN classifier procedure for one k, in torch (top-1, top-5 in percent)."""
    train_n = torch.nn.functional.normalize(train_x, dim=1)
    test_n = torch.nn.functional.normalize(test_x, dim=1)
    train_t = train_n.t()
    num_test = test_n.shape[0]
    chunks = 100
    per_chunk = num_test // chunks
    top1 = top5 = 0
    one_hot = torch.zeros(per_chunk * k, num_classes)
    for start in range(0, num_test, per_chunk):
        rows = test_n[start : min(start + per_chunk, num_test)]
        targets = test_y[start : min(start + per_chunk, num_test)]
        batch = rows.shape[0]
        similarity = torch.mm(rows, train_t)
        distances, indices = similarity.topk(k, largest=True, sorted=True)
        candidates = train_y.view(1, -1).expand(batch, -1)
        neighbours = torch.gather(candidates, 1, indices)
        one_hot.resize_(batch * k, num_classes).zero_()
        one_hot.scatter_(1, neighbours.view(-1, 1), 1)
        weights = distances.clone().div_(temperature).exp_()
        scores = torch.sum(one_hot.view(batch, -1, num_classes) * weights.view(batch, -1, 1), 1)
        _, predictions = scores.sort(1, True)
        correct = predictions.eq(targets.view(-1, 1))
        top1 += correct.narrow(1, 0, 1).sum().item()
        top5 += correct.narrow(1, 0, min(5, k)).sum().item()
    return 100.0 * top1 / num_test, 100.0 * top5 / num_test


def torch_linear_probe(torch, train_x, train_y, test_x, test_y, num_classes, epochs, batch_size, seed):
    """The reference's linear-probe training loop on cached features; returns final/best top-1."""
    torch.manual_seed(seed)
    layer = torch.nn.Linear(train_x.shape[1], num_classes)
    layer.weight.data.normal_(mean=0.0, std=0.01)
    layer.bias.data.zero_()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.001 * batch_size / 256, momentum=0.9, weight_decay=0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs, eta_min=0)
    loss_fn = torch.nn.CrossEntropyLoss()
    best = final = 0.0
    for _ in range(epochs):
        order = torch.randperm(train_x.shape[0])
        for start in range(0, train_x.shape[0], batch_size):
            index = order[start : start + batch_size]
            loss = loss_fn(layer(train_x[index]), train_y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step()
        with torch.no_grad():
            final = 100.0 * (layer(test_x).argmax(1) == test_y).float().mean().item()
        best = max(best, final)
    return final, best


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--skip-torch", action="store_true", help="time ours only")
    parser.add_argument("--only", choices=("knn", "linear"), help="run one of the two benchmarks")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="torch intra-op threads (default: the machine's core count)",
    )
    args = parser.parse_args()

    import jax
    import torch

    from dino_jax.eval.knn import weighted_knn
    from dino_jax.eval.linear import linear_probe

    cores = os.cpu_count() or 1
    torch.set_num_threads(args.torch_threads or cores)
    if args.quick:
        knn_train, knn_test, linear_train, linear_test, epochs = 5000, 1000, 5000, 1000, 5
    else:
        knn_train, knn_test, linear_train, linear_test, epochs = 50_000, 10_000, 50_000, 10_000, 100
    num_classes, ks, temperature = 100, (5, 10, 20, 100, 200), 0.07
    report = {
        "device": str(jax.devices()[0].platform),
        "cores": cores,
        "torch_threads": torch.get_num_threads(),
        "knn_train": knn_train,
        "knn_test": knn_test,
        "knn_dim": 192,
        "linear_train": linear_train,
        "linear_dim": 768,
        "linear_epochs": epochs,
        "classes": num_classes,
    }

    # Separate generators: `--only` runs see the same data as a full run.
    if args.only != "linear":
        run_knn(
            args,
            report,
            np.random.default_rng(0),
            torch,
            weighted_knn,
            knn_train,
            knn_test,
            num_classes,
            ks,
            temperature,
        )
    if args.only != "knn":
        run_linear(
            args,
            report,
            np.random.default_rng(1),
            torch,
            linear_probe,
            linear_train,
            linear_test,
            num_classes,
            epochs,
        )
    print(json.dumps(report))


def run_knn(args, report, rng, torch, weighted_knn, knn_train, knn_test, num_classes, ks, temperature):
    centres = rng.standard_normal((num_classes, 192)).astype(np.float32)
    train_x, train_y = clustered_features(rng, num_classes, 192, knn_train, centres, 4.0)
    test_x, test_y = clustered_features(rng, num_classes, 192, knn_test, centres, 4.0)
    started = time.perf_counter()
    ours = weighted_knn(
        train_x, train_y, test_x, test_y, num_classes=num_classes, ks=ks, temperature=temperature
    )
    report["knn_first_call_s"] = time.perf_counter() - started
    started = time.perf_counter()
    ours = weighted_knn(
        train_x, train_y, test_x, test_y, num_classes=num_classes, ks=ks, temperature=temperature
    )
    report["knn_s"] = time.perf_counter() - started
    report["knn_k20_top1"] = ours["knn_k20_top1"]
    print(
        f"kNN ours: {report['knn_s']:.2f} s (first call {report['knn_first_call_s']:.2f} s), "
        f"k=20 top-1 {ours['knn_k20_top1']:.2f}",
        flush=True,
    )
    if not args.skip_torch:
        tensors = [torch.from_numpy(a) for a in (train_x, train_y, test_x, test_y)]
        started = time.perf_counter()
        baseline = {k: torch_knn(torch, *tensors, num_classes, k, temperature) for k in ks}
        report["knn_torch_s"] = time.perf_counter() - started
        report["knn_speedup"] = report["knn_torch_s"] / report["knn_s"]
        report["knn_torch_k20_top1"] = baseline[20][0]
        mismatched = [k for k in ks if not math.isclose(baseline[k][0], ours[f"knn_k{k}_top1"], abs_tol=0.05)]
        report["knn_top1_mismatched_ks"] = mismatched
        print(
            f"kNN torch reference: {report['knn_torch_s']:.2f} s, k=20 top-1 "
            f"{baseline[20][0]:.2f}; top-1 differs beyond 0.05 points for k in {mismatched}",
            flush=True,
        )


def run_linear(args, report, rng, torch, linear_probe, linear_train, linear_test, num_classes, epochs):
    centres = rng.standard_normal((num_classes, 768)).astype(np.float32)
    train_x, train_y = clustered_features(rng, num_classes, 768, linear_train, centres, 6.0)
    test_x, test_y = clustered_features(rng, num_classes, 768, linear_test, centres, 6.0)
    started = time.perf_counter()
    (result,) = linear_probe(
        train_x,
        train_y,
        test_x,
        test_y,
        num_classes=num_classes,
        epochs=epochs,
        batch_size=128,
        base_lrs=(0.001,),
    )
    report["linear_s"] = time.perf_counter() - started
    report["linear_best_test_top1"] = result.best_test_top1
    print(
        f"linear ours: {report['linear_s']:.2f} s (compilation included), best test top-1 "
        f"{result.best_test_top1:.2f}",
        flush=True,
    )
    if not args.skip_torch:
        tensors = [
            torch.from_numpy(a) for a in (train_x, train_y.astype(np.int64), test_x, test_y.astype(np.int64))
        ]
        started = time.perf_counter()
        final, best = torch_linear_probe(torch, *tensors, num_classes, epochs, 128, seed=0)
        report["linear_torch_s"] = time.perf_counter() - started
        report["linear_speedup"] = report["linear_torch_s"] / report["linear_s"]
        report["linear_torch_best_test_top1"] = best
        print(
            f"linear torch reference: {report['linear_torch_s']:.2f} s, best test top-1 {best:.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
