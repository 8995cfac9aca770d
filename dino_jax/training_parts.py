"""Everything the train step needs, built from a validated config: the step plan, the schedules,
the optimiser, the initial state already on the mesh (or its shapes only) and the jitted, donated
step. The Trainer builds its run from it; `aot.py` compiles its step for devices that are not
here, and the benches and tests time and check it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from dino_jax import config as config_lib
from dino_jax import optim, sharding
from dino_jax import schedules as schedules_lib
from dino_jax import state as state_lib
from dino_jax import train_step as step_lib
from dino_jax.models import dino


def build_model_fn(config: ml_collections.ConfigDict):
    """`rngs -> DINO` for this config. The one graphdef serves student and teacher: the teacher
    runs it without a drop-path key, so stochastic depth stays off for it."""
    vit_config = config_lib.vit_config(config, drop_path=True)
    head_config = config_lib.head_config(config, vit_config.embed_dim)
    return lambda rngs: dino.DINO(vit_config, head_config, rngs=rngs)


@dataclasses.dataclass
class TrainingParts:
    plan: config_lib.StepPlan
    schedules: schedules_lib.Schedules
    graphdef: Any
    state: state_lib.TrainState
    step_fn: Callable  # jitted (state, global batch) -> (state, metrics), state donated
    crop_config: Any
    tx: Any  # the optax optimiser inside step_fn (benchmarks time its update alone)


def build_training(
    config: ml_collections.ConfigDict, num_train_examples: int, mesh, *, abstract_state: bool = False
) -> TrainingParts:
    """Schedules, optimiser, sharded initial state and the jitted step, from a validated config.

    `abstract_state`: the state as shapes with their shardings, nothing computed (the mesh may then
    be one of devices that are not here: `bench/gpu_aot.py` compiles the step for a GPU or TPU)."""
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
        build_model_fn(config),
        tx,
        out_dim=config.head.out_dim,
        seed=config.seed,
        mesh=mesh,
        compute_dtype=config.model.dtype,
        abstract=abstract_state,
    )
    crop_config = config_lib.crop_config(config)
    device_augment = None
    if config.augment.on == "device":
        from dino_jax.data.multicrop import device as multicrop_device

        device_augment = functools.partial(multicrop_device.multicrop_batch, config=crop_config)
    step_fn = step_lib.make_train_step(
        graphdef,
        tx,
        schedules,
        mean=config.dataset.mean,
        std=config.dataset.std,
        student_temp=t.student_temp,
        center_momentum=t.center_momentum,
        device_augment=device_augment,
        freeze_last_layer_steps=plan.freeze_last_layer_steps,
        data_shards=mesh.shape[sharding.DATA_AXIS],
    )
    state_sharding = jax.tree.map(lambda x: x.sharding, state)
    jitted = step_lib.jit_train_step(step_fn, state_sharding, sharding.batch_sharding(mesh))
    return TrainingParts(plan, schedules, graphdef, state, jitted, crop_config, tx)
