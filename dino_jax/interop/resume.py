"""A reference (PyTorch) training run continued here: its checkpoint into our train state
(`config.train.init_from`), including its AdamW moments.

PyTorch keeps one AdamW state per parameter; ours sits in optax's `ScaleByAdamState` nodes of the
optimiser `optim.make_optimizer` builds (one per parameter group). Moments are exchanged as
`{parameter name: (first moment, second moment, step count)}` in our layouts, named as
`optim.path_name` names them ('head.last_layer.weight_v').
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dino_jax import config as config_lib, optim
from dino_jax.interop.load import load_checkpoint
from dino_jax.interop.torch_convert import abstract_model
from dino_jax.interop.torch_io import CheckpointFormatError
from dino_jax.models import stacking
from dino_jax.interop.torch_keys import dino_key_table, from_torch_layout, torch_shape
from dino_jax.models.head import HeadConfig
from dino_jax.models.vit import ViTConfig

Moments = dict[str, tuple[np.ndarray, np.ndarray, int]]


def _is_adam(node) -> bool:
    return isinstance(node, optax.ScaleByAdamState)


def _is_masked(node) -> bool:
    return isinstance(node, optax.MaskedNode)


def start_from(
    path: str, state, *, image_size: int, steps_per_epoch: int, freeze_last_layer_steps: int
) -> tuple[Any, int]:
    """`(state, step)`: `state` (a fresh TrainState of the model the config describes) with the
    student, teacher, center and Adam moments of the PyTorch training checkpoint (or converted
    one) at `path`, at the first step of the checkpoint's epoch; the optimiser's schedule counters
    are set to that step, so training continues where the reference stopped. Raises ConfigError
    when the checkpoint holds no training run or another model."""
    imported = load_checkpoint(path, image_size=image_size)
    if imported.head_config is None or imported.student is None or imported.teacher is None:
        raise config_lib.ConfigError(
            f"config.train.init_from = {path!r}: expected a training checkpoint with student, teacher "
            "and head; this one holds a backbone only (use it with --mode=eval/visualize/embed)"
        )
    ours = {
        optim.path_name(p): np.shape(x) for p, x in jax.tree_util.tree_flatten_with_path(state.student)[0]
    }
    theirs = {
        optim.path_name(p): np.shape(x) for p, x in jax.tree_util.tree_flatten_with_path(imported.student)[0]
    }
    if ours != theirs:
        different = sorted(n for n in set(ours) | set(theirs) if ours.get(n) != theirs.get(n))
        raise config_lib.ConfigError(
            f"config.train.init_from = {path!r}: its model does not match config.model/config.head; "
            f"parameters that differ (ours vs the checkpoint's shape): "
            + ", ".join(f"{n} {ours.get(n)} vs {theirs.get(n)}" for n in different[:10])
        )
    step = int(imported.epoch or 0) * steps_per_epoch
    opt_state = state.opt_state
    if imported.optimizer is not None:
        moments = torch_adam_moments(imported.optimizer, imported.vit_config, imported.head_config)
        opt_state = fill_adam_moments(opt_state, moments)
    opt_state = optim.set_schedule_step(opt_state, step, freeze_last_layer_steps)
    like = lambda ref, new: jnp.asarray(new, ref.dtype)  # noqa: E731
    center = imported.center if imported.center is not None else np.zeros_like(state.center)
    started = state.replace(
        step=jnp.asarray(step, jnp.int32),
        student=jax.tree.map(like, state.student, imported.student),
        teacher=jax.tree.map(like, state.teacher, imported.teacher),
        opt_state=opt_state,
        center=jnp.asarray(center, jnp.float32).reshape(state.center.shape),
    )
    print(f"started from {path} at epoch {imported.epoch or 0} (step {step})", file=sys.stderr, flush=True)
    return jax.device_put(started, jax.tree.map(lambda x: x.sharding, state)), step


def _per_block(moments: Moments) -> Moments:
    """Moments of stacked parameters (`backbone.blocks.attn.qkv.kernel`) split into one entry per
    block (`backbone.blocks.3.attn.qkv.kernel`), the names the key tables use."""
    out = {}
    for name, (first, second, count) in moments.items():
        path = tuple(name.split("."))
        if stacking.stack_position(path) is None:
            out[name] = (first, second, count)
            continue
        split_first, split_second = stacking.per_block({path: first}), stacking.per_block({path: second})
        for block_path, value in split_first.items():
            out[".".join(map(str, block_path))] = (value, split_second[block_path], count)
    return out


def _stacked(moments: Moments) -> Moments:
    """The inverse of `_per_block`; the blocks of one stacked parameter must share a step count."""
    paths = {tuple(name.split(".")): name for name in moments}
    firsts = stacking.stacked({path: moments[name][0] for path, name in paths.items()}, xp=np)
    seconds = stacking.stacked({path: moments[name][1] for path, name in paths.items()}, xp=np)
    counts: dict[str, set[int]] = {}
    for path, name in paths.items():
        position = next(
            (p for p in range(len(path) - 1) if path[p] == stacking.STACKED and path[p + 1].isdigit()), None
        )
        key = ".".join(path if position is None else path[: position + 1] + path[position + 2 :])
        counts.setdefault(key, set()).add(moments[name][2])
    out = {}
    for path, first in firsts.items():
        name = ".".join(path)
        if len(counts[name]) > 1:
            raise CheckpointFormatError(f"the blocks of {name} were stepped {sorted(counts[name])} times")
        out[name] = (first, seconds[path], counts[name].pop())
    return out


def adam_moments(opt_state) -> Moments:
    """`{parameter name: (first moment, second moment, step count)}` in our layout, from every
    `scale_by_adam` state inside an optax state (chains, multi_transform groups, wrappers); leaves
    masked out of a group are skipped, so each parameter appears once. Stacked blocks are named one
    block at a time (`backbone.blocks.3.attn.qkv.kernel`), as the key tables name them."""
    moments = {}
    for node in jax.tree_util.tree_leaves(opt_state, is_leaf=_is_adam):
        if not _is_adam(node):
            continue
        count = int(jax.device_get(node.count))
        mu = jax.tree_util.tree_flatten_with_path(node.mu, is_leaf=_is_masked)[0]
        nu = dict(jax.tree_util.tree_flatten_with_path(node.nu, is_leaf=_is_masked)[0])
        for path, first in mu:
            if _is_masked(first):
                continue
            name = optim.path_name(path)
            if name in moments:
                raise ValueError(f"parameter {name} has Adam moments in two groups")
            moments[name] = (np.asarray(jax.device_get(first)), np.asarray(jax.device_get(nu[path])), count)
    return _per_block(moments)


def torch_adam_moments(
    optimizer_state: Mapping[str, Any],
    vit_config: ViTConfig,
    head_config: HeadConfig,
    *,
    parametrized: bool = False,
) -> Moments:
    """The reference's AdamW state (`checkpoint['optimizer']`) as `{our DINO parameter name:
    (exp_avg, exp_avg_sq, step)}` in our layouts.

    PyTorch indexes its state by position in `param_groups`; the reference builds those groups
    from the student's trainable parameters in module order, decayed ones (>= 2 dims, not a bias)
    first. A tensor the optimizer never stepped (the last layer during its freeze) has no entry.
    """
    table = dino_key_table(vit_config, head_config, parametrized=parametrized)
    _, abstract = abstract_model(vit_config, head_config)
    shapes = stacking.per_block_shapes({path: var.shape for path, var in nnx.to_flat_state(abstract)})
    trainable = [
        entry for entry in table if not (head_config.norm_last_layer and entry.ours[-1] == "weight_g")
    ]

    def decayed(entry):
        return not entry.torch.endswith(".bias") and len(shapes[entry.ours]) > 1

    ordered = [e for e in trainable if decayed(e)] + [e for e in trainable if not decayed(e)]
    groups = optimizer_state.get("param_groups", [])
    indices = [index for group in groups for index in group["params"]]
    if len(indices) != len(ordered):
        raise CheckpointFormatError(
            f"the optimizer state has {len(indices)} parameters, the model {len(ordered)} trainable "
            f"ones (norm_last_layer={head_config.norm_last_layer}): it was saved for another model"
        )
    moments = {}
    for index, entry in zip(indices, ordered):
        state = optimizer_state.get("state", {}).get(index)
        if not state:
            continue
        first, second = np.asarray(state["exp_avg"]), np.asarray(state["exp_avg_sq"])
        want = torch_shape(shapes[entry.ours], entry.layout)
        if first.shape != want or second.shape != want:
            raise CheckpointFormatError(
                f"optimizer moments of {entry.torch} have shape {first.shape}, expected {want}"
            )
        moments[entry.name] = (
            from_torch_layout(first, entry.layout).astype(np.float32),
            from_torch_layout(second, entry.layout).astype(np.float32),
            int(np.asarray(state["step"])),
        )
    return moments


def fill_adam_moments(opt_state, moments: Moments):
    """`opt_state` with the first/second moments of every `scale_by_adam` state replaced by
    `moments` (named as `adam_moments` names them), and each Adam state's step count set to that
    of its parameters. Other counters (schedules, freeze) are left to the caller, who knows the
    global step. Raises if a group mixes step counts or a moment has no parameter here."""
    moments = _stacked(moments)
    used = set()

    def fill(node):
        if not _is_adam(node):
            return node
        steps = set()

        def replace(which):
            def leaf(path, value):
                name = optim.path_name(path)
                if _is_masked(value) or name not in moments:
                    return value
                used.add(name)
                steps.add(moments[name][2])
                return jnp.asarray(moments[name][which], value.dtype)

            return leaf

        mu = jax.tree_util.tree_map_with_path(replace(0), node.mu, is_leaf=_is_masked)
        nu = jax.tree_util.tree_map_with_path(replace(1), node.nu, is_leaf=_is_masked)
        if len(steps) > 1:
            raise CheckpointFormatError(f"one Adam group holds parameters at steps {sorted(steps)}")
        count = jnp.asarray(steps.pop(), node.count.dtype) if steps else node.count
        return node._replace(count=count, mu=mu, nu=nu)

    filled = jax.tree_util.tree_map(fill, opt_state, is_leaf=_is_adam)
    unused = sorted(set(moments) - used)
    if unused:
        raise CheckpointFormatError(
            f"optimizer moments for parameters this optimizer does not update: {', '.join(unused)}"
        )
    return filled
