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


def crop_major(crops_BxVxHxWxC: jax.Array, shards: int = 1) -> jax.Array:
    """(B, V, H, W, C) -> (V*B, H, W, C) ordered [view 0 of every image, view 1, ...], the
    reference's row order; with the batch split over `shards` devices, that order device by
    device (device s's views of its own images), so that no image leaves its device.

    Merging (V, B) with the device-split B inside it is a layout XLA cannot keep split: it gathered
    every crop onto every device, and each of a TPU v2-8's cores ran the whole batch (compiled for
    it, tests/test_aot_tpu.py)."""
    b, v = crops_BxVxHxWxC.shape[:2]
    per_device = crops_BxVxHxWxC.reshape(shards, b // shards, v, *crops_BxVxHxWxC.shape[2:])
    return jnp.swapaxes(per_device, 1, 2).reshape(v * b, *crops_BxVxHxWxC.shape[2:])


def global_norm(tree) -> jax.Array:
    """L2 norm of every element of `tree`, from the norms of its tensors (`optim.tensor_norms_tree`).
    The per-tensor gradient clipping computes the same norms of the gradient, and XLA computes them
    once for both."""
    norms = jax.tree.leaves(optim.tensor_norms_tree(tree))
    return jnp.sqrt(sum(jnp.sum(jnp.square(norm)) for norm in norms))


def normalized_crop_groups(global_crops, local_crops, mean, std, shards: int = 1) -> list[jax.Array]:
    """uint8 crops (B, V, H, W, C) -> one normalised crop-major group per resolution (device by
    device with `shards`), globals first (the local group is left out without local crops)."""
    groups = [normalize.normalize_images(crop_major(global_crops, shards), mean, std)]
    if local_crops.shape[1]:
        groups.append(normalize.normalize_images(crop_major(local_crops, shards), mean, std))
    return groups


def teacher_forward(graphdef, teacher_params, global_group: jax.Array, shards: int = 1) -> jax.Array:
    """The teacher's logits (2B, K) of the global crops (view-major device by device, as the crops
    are); no gradient flows into them."""
    return jax.lax.stop_gradient(nnx.merge(graphdef, teacher_params)([global_group], shards=shards))


def student_loss(
    graphdef,
    student_params,
    crop_groups: list[jax.Array],
    teacher_logits_2BxK: jax.Array,
    center_1xK: jax.Array,
    *,
    num_crops: int,
    teacher_temperature: jax.Array,
    student_temperature: float,
    drop_path_rng: jax.Array | None,
    shards: int = 1,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The student's forward over all crops and the DINO loss: `(loss, teacher monitors)`."""
    student = nnx.merge(graphdef, student_params)
    student_logits = student(crop_groups, drop_path_rng=drop_path_rng, shards=shards)
    return losses.dino_loss(
        student_logits,
        teacher_logits_2BxK,
        center_1xK,
        num_crops=num_crops,
        teacher_temperature=teacher_temperature,
        student_temperature=student_temperature,
        shards=shards,
    )


def norm_metrics(grads, updates, student_params) -> dict[str, jax.Array]:
    """Global L2 norms of the raw gradient, the optimiser's update and the updated parameters."""
    return {
        "grad_norm": global_norm(grads),
        "update_norm": global_norm(updates),
        "param_norm": global_norm(student_params),
    }


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
    data_shards: int = 1,
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """Returns `train_step(state, batch) -> (state, metrics)`, not yet jitted.

    `batch` holds either `global_crops (B,2,G,G,C)` and `local_crops (B,L,l,l,C)` made on the host,
    or `image (B,H,W,C)` that `device_augment(images, key) -> (globals, locals)` crops here.
    `freeze_last_layer_steps` is the optimiser's (its schedules' position after a skipped step).
    `data_shards`: the devices the batch is split over (the mesh's `data` axis); the networks keep
    each device's crops on it (`crop_major`).
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
        crop_groups = normalized_crop_groups(global_crops, local_crops, mean, std, data_shards)

        epoch = state.step // schedules.steps_per_epoch
        teacher_temperature = schedules_lib.lookup(schedules.teacher_temperature, epoch)
        teacher_logits = teacher_forward(graphdef, state.teacher, crop_groups[0], data_shards)

        def loss_fn(student_params):
            return student_loss(
                graphdef,
                student_params,
                crop_groups,
                teacher_logits,
                state.center,
                num_crops=num_crops,
                teacher_temperature=teacher_temperature,
                student_temperature=student_temp,
                drop_path_rng=drop_path_key,
                shards=data_shards,
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
            **norm_metrics(grads, updates, student),
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
