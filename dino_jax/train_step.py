"""One DINO update as a pure function, jitted once with the state donated.

(uint8 crops | uint8 images -> device multi-crop) -> normalise
-> teacher(global crops), student(all crops) -> DINO loss -> grads
-> optax update -> EMA teacher (after the step, with the updated student) -> center update

Under float16 compute the loss is scaled before differentiation (loss_scale.py); a step whose
gradients are not all finite leaves the student and the optimiser's moments as they were (the
schedules still move to the next step) and halves the scale, as PyTorch's GradScaler skips
`optimizer.step`. The teacher EMA and the center update as they do in the reference's skipped
steps, the center only from finite teacher outputs.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dino_jax import loss_scale as loss_scale_lib, losses, optim, schedules as schedules_lib
from dino_jax.data import normalize
from dino_jax.state import TrainState


def crop_major(crops_BxVxHxWxC: jax.Array) -> jax.Array:
    """(B, V, H, W, C) -> (V*B, H, W, C) ordered [view 0 of every image, view 1, ...], the
    reference's row order."""
    b, v = crops_BxVxHxWxC.shape[:2]
    return jnp.swapaxes(crops_BxVxHxWxC, 0, 1).reshape(v * b, *crops_BxVxHxWxC.shape[2:])


def global_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def make_train_step(
    graphdef,
    tx: optax.GradientTransformation,
    schedules: schedules_lib.Schedules,
    *,
    mean,
    std,
    student_temp: float,
    center_momentum: float,
    device_augment: Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]] | None = None,
    freeze_last_layer_steps: int = 0,
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """Returns `train_step(state, batch) -> (state, metrics)`, not yet jitted.

    `batch` holds either `global_crops (B,2,G,G,C)` and `local_crops (B,L,l,l,C)` made on the host,
    or `image (B,H,W,C)` that `device_augment(images, key) -> (globals, locals)` crops here.
    `freeze_last_layer_steps` is the optimiser's (its schedules' position after a skipped step).
    """

    def train_step(state: TrainState, batch: dict[str, Any]):
        step_key = jax.random.fold_in(state.rng, state.step)
        augment_key, drop_path_key = jax.random.split(step_key)
        if "image" in batch:
            if device_augment is None:
                raise ValueError("batch holds raw images but no device augmentation was configured")
            global_crops, local_crops = device_augment(batch["image"], augment_key)
        else:
            global_crops, local_crops = batch["global_crops"], batch["local_crops"]
        num_crops = global_crops.shape[1] + local_crops.shape[1]
        crop_groups = [normalize.normalize_images(crop_major(global_crops), mean, std)]
        if local_crops.shape[1]:
            crop_groups.append(normalize.normalize_images(crop_major(local_crops), mean, std))

        epoch = state.step // schedules.steps_per_epoch
        teacher_temperature = schedules_lib.lookup(schedules.teacher_temperature, epoch)
        teacher_logits = jax.lax.stop_gradient(nnx.merge(graphdef, state.teacher)(crop_groups[:1]))

        def loss_fn(student_params):
            student = nnx.merge(graphdef, student_params)
            student_logits = student(crop_groups, drop_path_rng=drop_path_key)
            return losses.dino_loss(
                student_logits,
                teacher_logits,
                state.center,
                num_crops=num_crops,
                teacher_temperature=teacher_temperature,
                student_temperature=student_temp,
            )

        scaling = state.loss_scale
        if scaling is None:
            (loss, monitors), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.student)
        else:

            def scaled_loss_fn(student_params):
                loss, monitors = loss_fn(student_params)
                return loss * scaling.scale, (loss, monitors)

            (_, (loss, monitors)), grads = jax.value_and_grad(scaled_loss_fn, has_aux=True)(state.student)
            grads = loss_scale_lib.unscale(scaling, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.student)
        student = optax.apply_updates(state.student, updates)
        if scaling is not None:
            finite = loss_scale_lib.all_finite(grads)
            skipped_opt_state = optim.set_schedule_step(
                state.opt_state, state.step + 1, freeze_last_layer_steps
            )
            student, opt_state = _where(finite, (student, opt_state), (state.student, skipped_opt_state))
            updates = _where(finite, updates, jax.tree.map(jnp.zeros_like, updates))
        momentum = schedules_lib.lookup(schedules.momentum, state.step)
        teacher = optim.ema(state.teacher, student, momentum)
        center = losses.update_center(state.center, teacher_logits, center_momentum)
        if scaling is not None:
            center = jnp.where(loss_scale_lib.all_finite(teacher_logits), center, state.center)
            scaling = loss_scale_lib.adjust(scaling, finite)
            monitors = {
                **monitors,
                "loss_scale": scaling.scale,
                "skipped_step": 1.0 - finite.astype(jnp.float32),
            }

        metrics = {
            "loss": loss,
            "lr": schedules_lib.lookup(schedules.lr, state.step),
            "weight_decay": schedules_lib.lookup(schedules.weight_decay, state.step),
            "momentum": momentum,
            "teacher_temperature": teacher_temperature,
            "grad_norm": global_norm(grads),
            "update_norm": global_norm(updates),
            "param_norm": global_norm(student),
            **monitors,
        }
        new_state = state.replace(
            step=state.step + 1,
            student=student,
            teacher=teacher,
            opt_state=opt_state,
            center=center,
            loss_scale=scaling,
        )
        return new_state, metrics

    return train_step


def _where(condition: jax.Array, if_true, if_false):
    return jax.tree.map(lambda a, b: jnp.where(condition, a, b), if_true, if_false)


def jit_train_step(train_step, state_sharding, batch_sharding):
    """jit with the state donated (updated in place) and explicit in/out shardings."""
    return jax.jit(
        train_step,
        in_shardings=(state_sharding, batch_sharding),
        out_shardings=(state_sharding, None),
        donate_argnums=(0,),
    )
