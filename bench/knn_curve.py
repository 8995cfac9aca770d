"""kNN of the teacher and the student at every checkpoint of a training workdir: the learning
curve behind a run's final number (used for the digits recipe in docs/results.md).

    python -m bench.knn_curve runs/digits

Prints one line per checkpoint and, last, one JSON object mapping `step_<n>_{teacher,student}_knn_k20_top1`
to percent.
"""

from __future__ import annotations

import argparse
import json
import os

from dino_jax import checkpointing, config as config_lib, evaluation, sharding, training_parts
from dino_jax.models import dino


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir")
    args = parser.parse_args()
    config = config_lib.load_run_config(args.workdir)
    num_train = len(config_lib.open_split(config, "pretrain"))  # what the run trained on
    mesh = sharding.make_mesh()
    parts = training_parts.build_training(config, num_train, mesh)
    checkpointer = checkpointing.Checkpointer(os.path.join(args.workdir, "checkpoints"))
    figures = {}
    for step in checkpointer.all_steps():
        state = checkpointer.restore(checkpointing.abstract_like(parts.state), step=step)
        line = [f"step {step}"]
        for network in ("teacher", "student"):
            graphdef, params = dino.split_backbone(parts.graphdef, getattr(state, network))
            knn = evaluation.knn(
                config,
                graphdef,
                params,
                image_size=config.augment.global_crop_size,
                mean=config.dataset.mean,
                std=config.dataset.std,
                mesh=mesh,
            )
            figures[f"step_{step}_{network}_knn_k20_top1"] = round(knn["knn_k20_top1"], 2)
            line.append(f"{network} kNN k=20 {knn['knn_k20_top1']:.2f} k=5 {knn['knn_k5_top1']:.2f}")
        print(" | ".join(line), flush=True)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
