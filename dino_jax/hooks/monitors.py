"""Hooks that measure the train state during training: the kNN monitor of the teacher's features
and the attention panel of its last block."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from dino_jax.hooks.base import Hook, StateResults
from dino_jax.models import dino


def _print(*args):
    print(*args, file=sys.stderr, flush=True)


class KnnMonitor(Hook):
    """Every `every_steps` steps (and before the first), the weighted kNN top-1/top-5 of the
    teacher's backbone (and the student's) on the monitor's fixed subsets, as
    `monitor_{teacher,student}_knn_k{k}_top{1,5}` (percent) with `monitor_seconds`, and a console
    line. `knn_fn(vit_graphdef, vit_params) -> {"knn_k{k}_top1": ...}` runs the evaluation
    (`evaluation.knn` on `evaluation.monitor_data`: `num_train` neighbours, `num_test` queries);
    `graphdef` is the DINO model's; `untrained` the teacher's accuracy at step 0, if known (a
    resumed run's)."""

    def __init__(
        self,
        graphdef,
        knn_fn: Callable[[Any, Any], dict[str, float]],
        *,
        every_steps: int,
        k: int,
        num_train: int,
        num_test: int,
        networks: Sequence[str] = ("teacher",),
        untrained: float | None = None,
    ):
        self.graphdef, self.knn_fn, self.every_steps, self.k = graphdef, knn_fn, every_steps, k
        self.num_train, self.num_test = num_train, num_test
        self.networks, self.untrained = tuple(networks), untrained

    def key(self, network: str, top: int = 1) -> str:
        return f"monitor_{network}_knn_k{self.k}_top{top}"

    def on_state(self, step: int, state) -> StateResults:
        # The steps dispatched since the last fetched metrics may still be computing: they finish
        # before the clock starts, so `monitor_seconds` is the monitor's own time, not theirs.
        jax.block_until_ready([getattr(state, network) for network in self.networks])
        started = time.perf_counter()
        scalars = {}
        for network in self.networks:
            vit_graphdef, params = dino.split_backbone(self.graphdef, getattr(state, network))
            knn = self.knn_fn(vit_graphdef, params)
            for top in (1, 5):
                scalars[self.key(network, top)] = knn[f"knn_k{self.k}_top{top}"]
        scalars["monitor_seconds"] = time.perf_counter() - started
        if step == 0:
            self.untrained = scalars[self.key("teacher")]
        accuracies = ", ".join(f"{network} {scalars[self.key(network)]:.2f}%" for network in self.networks)
        before = f" (untrained {self.untrained:.2f}%)" if self.untrained is not None and step else ""
        if jax.process_index() == 0:
            _print(
                f"kNN monitor at step {step}: k={self.k} top-1 {accuracies}{before} on {self.num_train} "
                f"train / {self.num_test} test images, {scalars['monitor_seconds']:.1f} s"
            )
        return StateResults(scalars)


class AttentionPanel(Hook):
    """Every `every_steps` steps, the teacher's last-block CLS attention on a fixed batch of test
    images as `<workdir>/attention/step_<step>.png` (and the writers' `attention/teacher` image),
    so a run's logs show what the heads attend to.

    `graphdef` is the DINO model's, `vit_graphdef` its backbone's (`models.dino.split_backbone`).
    """

    def __init__(
        self,
        workdir: str,
        graphdef,
        vit_graphdef,
        images_BxHxWx3: np.ndarray,
        *,
        every_steps: int,
        patch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
    ):
        from dino_jax.viz import attention  # matplotlib: loaded only when a panel is asked for

        self.every_steps = every_steps
        self.directory = os.path.join(workdir, "attention")
        self.graphdef, self.images, self.patch_size = graphdef, images_BxHxWx3, patch_size
        self.attention_fn = attention.make_cls_attention_fn(
            vit_graphdef, patch_size=patch_size, mean=mean, std=std
        )

    def on_state(self, step: int, state) -> StateResults:
        from PIL import Image

        from dino_jax.viz import attention

        _, params = dino.split_backbone(self.graphdef, state.teacher)
        # Every process computes the panel (a collective computation on the global parameters).
        panel = attention.attention_panel(self.attention_fn, params, self.images, patch_size=self.patch_size)
        if jax.process_index() != 0:
            return
        os.makedirs(self.directory, exist_ok=True)
        Image.fromarray(panel).save(os.path.join(self.directory, f"step_{step:07d}.png"))
        return StateResults(images={"attention/teacher": panel})
