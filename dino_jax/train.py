"""Orchestration of a training run. No numerics live here: it wires config -> data -> state ->
jitted step -> logs/checkpoints -> evaluation, and returns the final results (tests read them).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from dino_jax import checkpointing, config as config_lib, logging as log_lib, optim
from dino_jax import schedules as schedules_lib, sharding, state as state_lib, train_step as step_lib
from dino_jax.data import pipeline, sources
from dino_jax.models import dino


def _print(*args):
    print(*args, file=sys.stderr, flush=True)


def build_model_fn(config: ml_collections.ConfigDict):
    """`rngs -> DINO` for this config. The one graphdef serves student and teacher: the teacher
    runs it without a drop-path key, so stochastic depth stays off for it."""
    vit_config = config_lib.vit_config(config, drop_path=True)
    head_config = config_lib.head_config(config, vit_config.embed_dim)
    return lambda rngs: dino.DINO(vit_config, head_config, rngs=rngs)


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))


def load_saved_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {workdir} the workdir of a training run?")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


@dataclasses.dataclass
class TrainingParts:
    plan: config_lib.StepPlan
    schedules: schedules_lib.Schedules
    graphdef: Any
    state: state_lib.TrainState
    step_fn: Callable  # jitted (state, global batch) -> (state, metrics), state donated
    crop_config: Any
    tx: Any  # the optax optimiser inside step_fn (benchmarks time its update alone)


def build_training(config: ml_collections.ConfigDict, num_train_examples: int, mesh) -> TrainingParts:
    """Schedules, optimiser, sharded initial state and the jitted step, from a validated config."""
    plan = config_lib.plan_steps(config, num_train_examples)
    t = config.train
    schedules = schedules_lib.build_schedules(
        lr=plan.peak_lr,
        min_lr=t.min_lr,
        warmup_epochs=t.warmup_epochs,
        weight_decay=t.weight_decay,
        weight_decay_end=t.weight_decay_end,
        momentum_teacher=t.momentum_teacher,
        warmup_teacher_temp=t.warmup_teacher_temp,
        teacher_temp=t.teacher_temp,
        warmup_teacher_temp_epochs=t.warmup_teacher_temp_epochs,
        epochs=t.epochs,
        steps_per_epoch=plan.steps_per_epoch,
    )
    tx = optim.make_optimizer(
        lr_fn=lambda count: schedules_lib.lookup(schedules.lr, count),
        weight_decay_fn=lambda count: schedules_lib.lookup(schedules.weight_decay, count),
        clip_grad=t.clip_grad,
        freeze_last_layer_steps=plan.freeze_last_layer_steps,
        norm_last_layer=config.head.norm_last_layer,
    )
    graphdef, state = state_lib.create_train_state(
        build_model_fn(config), tx, out_dim=config.head.out_dim, seed=config.seed, mesh=mesh
    )
    crop_config = config_lib.crop_config(config)
    device_augment = None
    if config.augment.on == "device":
        from dino_jax.data import augment_device

        device_augment = functools.partial(augment_device.multicrop_batch, config=crop_config)
    step_fn = step_lib.make_train_step(
        graphdef,
        tx,
        schedules,
        mean=config.dataset.mean,
        std=config.dataset.std,
        student_temp=t.student_temp,
        center_momentum=t.center_momentum,
        device_augment=device_augment,
    )
    state_sharding = jax.tree.map(lambda x: x.sharding, state)
    jitted = step_lib.jit_train_step(step_fn, state_sharding, sharding.batch_sharding(mesh))
    return TrainingParts(plan, schedules, graphdef, state, jitted, crop_config, tx)


class Trainer:
    """Everything a run builds once: data, state, jitted step, checkpointer."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        config_lib.validate(config)
        self.config, self.workdir = config, workdir
        os.makedirs(workdir, exist_ok=True)
        self.mesh = sharding.make_mesh()
        config_lib.check_divisible(config.train.batch_size, jax.device_count())

        spec = sources.DATASETS[config.dataset.name]
        data_dir = config.dataset.data_dir or None
        self.train_source = sources.load_source(config.dataset.name, spec.train_split, data_dir)
        parts = build_training(config, len(self.train_source), self.mesh)
        self.plan, self.schedules, self.graphdef = parts.plan, parts.schedules, parts.graphdef
        self.state, self.step_fn, self.crop_config = parts.state, parts.step_fn, parts.crop_config
        self.data_iterator = iter(
            pipeline.train_dataset(
                self.train_source,
                self.crop_config,
                global_batch_size=config.train.batch_size,
                seed=config.seed,
                augment_on=config.augment.on,
                num_workers=config.augment.num_workers,
            )
        )
        t = config.train
        self.checkpointer = checkpointing.Checkpointer(
            os.path.join(workdir, "checkpoints"),
            max_to_keep=t.keep_checkpoints,
            save_every_steps=t.checkpoint_every_steps,
        )

    def restore_if_any(self) -> int:
        if self.checkpointer.latest_step() is None:
            if self.config.train.init_from:
                return self.start_from(self.config.train.init_from)
            return 0
        self.state = self.checkpointer.restore(checkpointing.abstract_like(self.state), self.data_iterator)
        step = int(self.state.step)
        _print(f"resumed from {self.checkpointer.directory} at step {step}")
        return step

    def start_from(self, path: str) -> int:
        """Takes student, teacher, center, Adam moments and the epoch from a PyTorch training
        checkpoint (or a converted one); the optimiser's schedule counters are set to the epoch's
        first step, so training continues where the reference stopped."""
        from dino_jax.interop import cli, torch_ckpt

        imported = cli.load_checkpoint(path, image_size=self.config.augment.global_crop_size).model
        if imported.head_config is None or imported.student is None or imported.teacher is None:
            raise config_lib.ConfigError(
                f"config.train.init_from = {path!r}: expected a training checkpoint with student, teacher "
                "and head; this one holds a backbone only (use it with --mode=eval/visualize/embed)"
            )
        ours = {
            optim.path_name(p): np.shape(x)
            for p, x in jax.tree_util.tree_flatten_with_path(self.state.student)[0]
        }
        theirs = {
            optim.path_name(p): np.shape(x)
            for p, x in jax.tree_util.tree_flatten_with_path(imported.student)[0]
        }
        if ours != theirs:
            different = sorted(n for n in set(ours) | set(theirs) if ours.get(n) != theirs.get(n))
            raise config_lib.ConfigError(
                f"config.train.init_from = {path!r}: its model does not match config.model/config.head; "
                f"parameters that differ (ours vs the checkpoint's shape): "
                + ", ".join(f"{n} {ours.get(n)} vs {theirs.get(n)}" for n in different[:10])
            )
        step = int(imported.epoch or 0) * self.plan.steps_per_epoch
        opt_state = self.state.opt_state
        if imported.optimizer is not None:
            moments = torch_ckpt.torch_adam_moments(
                imported.optimizer, imported.vit_config, imported.head_config
            )
            opt_state = torch_ckpt.fill_adam_moments(opt_state, moments)
        opt_state = optim.set_schedule_step(opt_state, step, self.plan.freeze_last_layer_steps)
        like = lambda ref, new: jnp.asarray(new, ref.dtype)  # noqa: E731
        center = imported.center if imported.center is not None else np.zeros_like(self.state.center)
        state = self.state.replace(
            step=jnp.asarray(step, jnp.int32),
            student=jax.tree.map(like, self.state.student, imported.student),
            teacher=jax.tree.map(like, self.state.teacher, imported.teacher),
            opt_state=opt_state,
            center=jnp.asarray(center, jnp.float32).reshape(self.state.center.shape),
        )
        self.state = jax.device_put(state, jax.tree.map(lambda x: x.sharding, self.state))
        _print(f"started from {path} at epoch {imported.epoch or 0} (step {step})")
        return step

    def next_batch(self):
        return sharding.to_global_batch(next(self.data_iterator), self.mesh)

    def train(self) -> dict[str, float]:
        """Runs the remaining steps; returns the last logged metrics."""
        config, plan = self.config, self.plan
        start = self.restore_if_any()
        writer = log_lib.MetricsWriter(self.workdir)
        progress = log_lib.Progress(plan.train_steps, config.train.batch_size)
        _print(
            f"training {plan.train_steps} steps ({plan.steps_per_epoch} per epoch, batch "
            f"{config.train.batch_size}, {jax.device_count()} device(s), augment on {config.augment.on}); "
            f"the first step compiles"
        )
        progress.start(start)
        last: dict[str, float] = {}
        warned = False
        pending = None  # (step, device metrics): fetched one step late so the host never stalls
        for step in range(start, plan.train_steps):
            self.state, metrics = self.step_fn(self.state, self.next_batch())
            done = step + 1
            if pending is not None:
                last, warned = self._report(*pending, writer, progress, warned)
                pending = None
            if done % config.train.log_every_steps == 0 or done == plan.train_steps:
                pending = (done, metrics)
            if config.eval.attention_every_steps and done % config.eval.attention_every_steps == 0:
                self.save_attention_panel(done)
            if done % config.train.checkpoint_every_steps == 0 and done != plan.train_steps:
                # A checkpoint is written only for a finite state.
                if pending is not None:
                    last, warned = self._report(*pending, writer, progress, warned)
                    pending = None
                else:
                    log_lib.check_finite(done, log_lib.fetch(metrics))
                self.checkpointer.save(done, self.state, self.data_iterator)
        if pending is not None:
            last, warned = self._report(*pending, writer, progress, warned)
        if plan.train_steps > start:
            self.checkpointer.save(plan.train_steps, self.state, self.data_iterator, force=True)
        self.checkpointer.wait()
        writer.close()
        return last

    def save_attention_panel(self, step: int) -> str:
        """Renders the teacher's last-block CLS attention on a fixed set of test images into
        `<workdir>/attention/step_<step>.png`, so a run's logs show what the heads attend to."""
        from PIL import Image

        from dino_jax import evaluation
        from dino_jax.viz import attention

        if not hasattr(self, "_panel"):
            graphdef, _ = backbone_of(self.graphdef, self.state.teacher)
            fn = attention.make_cls_attention_fn(
                graphdef,
                patch_size=self.config.model.patch_size,
                mean=self.config.dataset.mean,
                std=self.config.dataset.std,
            )
            self._panel = (graphdef, fn, evaluation.test_panel_images(self.config))
        _, fn, images = self._panel
        _, params = backbone_of(self.graphdef, self.state.teacher)
        panel = attention.attention_panel(fn, params, images, patch_size=self.config.model.patch_size)
        directory = os.path.join(self.workdir, "attention")
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, f"step_{step:07d}.png")
        Image.fromarray(panel).save(path)
        return path

    def _report(self, step, device_metrics, writer, progress, warned):
        metrics = log_lib.fetch(device_metrics)
        writer.write(step, metrics)
        log_lib.check_finite(step, metrics)
        metrics["images_per_s"] = progress.report(step, metrics)
        if not warned and step >= self.plan.steps_per_epoch * max(self.config.train.freeze_last_layer, 1) * 2:
            message = log_lib.collapse_warning(metrics, self.config.head.out_dim)
            if message:
                _print("WARNING: " + message)
                warned = True
        return metrics, warned


def backbone_of(graphdef, params):
    """(graphdef, params) of the ViT inside a DINO model, for evaluation and visualisation."""
    return nnx.split(nnx.merge(graphdef, params).backbone, nnx.Param)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains, then evaluates the teacher with the configured suite; writes
    `<workdir>/results.json` and `results.md`; returns the results (percent)."""
    from dino_jax import evaluation

    started = time.perf_counter()
    trainer = Trainer(config, workdir)
    save_config(config, workdir)
    results_path = os.path.join(workdir, "results.json")
    results: dict[str, float] = {}
    if os.path.exists(results_path):
        with open(results_path) as f:
            results = json.load(f)
    image_size = config.augment.global_crop_size
    norm = dict(mean=config.dataset.mean, std=config.dataset.std)
    if (
        config.eval.random_init_knn
        and "random_init_knn_k20_top1" not in results
        and trainer.checkpointer.latest_step() is None
    ):
        _print("kNN of the untrained network (the baseline training must beat)...")
        graphdef, params = backbone_of(trainer.graphdef, trainer.state.teacher)
        baseline = evaluation.knn_only(
            config, graphdef, params, image_size=image_size, mesh=trainer.mesh, **norm
        )
        results.update({f"random_init_{k}": v for k, v in baseline.items()})
        _write_json(results_path, results)
        _print("untrained: " + ", ".join(f"{k} {v:.2f}" for k, v in baseline.items() if k.endswith("top1")))
    last = trainer.train()
    train_results = {"train_wall_s": time.perf_counter() - started}
    if last:
        train_results["final_loss"] = last["loss"]
    results.update(train_results)
    _write_json(results_path, results)
    trainer.checkpointer.close()
    _print("evaluating the trained teacher...")
    graphdef, params = backbone_of(trainer.graphdef, trainer.state.teacher)
    results.update(
        evaluation.evaluate(
            config, graphdef, params, out_dir=workdir, image_size=image_size, mesh=trainer.mesh, **norm
        )
    )
    summary = ", ".join(
        f"{k} {v:.2f}"
        for k, v in sorted(results.items())
        if k.endswith("top1") and "knn_k20" in k or k in ("linear_best_test_top1",)
    )
    _print(f"results ({results_path}, results.md): {summary}")
    return results


def _write_json(path: str, payload: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
