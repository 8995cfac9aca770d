"""The reference's update rule as one optax transformation (docs/reference.md, "One training iteration").

    per-tensor gradient clip -> AdamW per parameter group -> (last layer held during freeze)

Parameter groups, as `get_params_groups` builds them:
- decayed: every tensor with >= 2 dims whose name does not end in `bias` (pos_embed and cls_token
  included);
- not decayed: biases and 1-D tensors (LayerNorm, BatchNorm scales);
- not optimised at all: the head's `weight_g` when `norm_last_layer` freezes it at 1.

The last layer lives in its own AdamW so that, like PyTorch's per-parameter optimiser state, its
moments and bias-correction count start only when the freeze ends; its schedules are shifted by
the freeze length so they still read the global step.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dino_jax.models import stacking

GROUP_MAIN = "main"
GROUP_LAST_LAYER = "last_layer"
GROUP_FIXED = "fixed"


def path_name(path) -> str:
    """`('head', 'last_layer', 'weight_v')` -> `'head.last_layer.weight_v'` for any key kind.

    A trailing `value` (the array inside an nnx Variable) is dropped, so names end with the
    parameter's own name.
    """
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    if parts and parts[-1] == "value":
        parts.pop()
    return ".".join(parts)


def tensor_ndim(name: str, leaf) -> int:
    """Dimensions of the parameter tensor a leaf holds: a stacked leaf (`backbone.blocks.*`,
    models/stacking.py) holds one tensor per block along its first axis."""
    return jnp.ndim(leaf) - (1 if stacking.is_stacked_name(name) else 0)


def is_decayed(name: str, leaf) -> bool:
    return not (name.endswith("bias") or tensor_ndim(name, leaf) <= 1)


def param_labels(params, *, norm_last_layer: bool):
    def label(path, leaf):
        name = path_name(path)
        if "last_layer" in name:
            if norm_last_layer and name.endswith("weight_g"):
                return GROUP_FIXED
            return GROUP_LAST_LAYER
        return GROUP_MAIN

    return jax.tree_util.tree_map_with_path(label, params)


def decay_mask(params):
    return jax.tree_util.tree_map_with_path(lambda p, leaf: is_decayed(path_name(p), leaf), params)


def clip_by_tensor_norm(max_norm: float) -> optax.GradientTransformation:
    """Clips each tensor's gradient to L2 norm `max_norm` on its own (not a global-norm clip); a
    stacked leaf's blocks are clipped each on its own, as the reference's separate tensors are.

    The factor is `max_norm / (norm + 1e-6)` and applies only when below 1, as in the reference.
    """

    def update_fn(updates, state, params=None):
        del params

        def clip(g, norm):
            factor = max_norm / (norm + 1e-6)
            return jnp.where(factor < 1, g * factor, g).astype(g.dtype)

        return jax.tree.map(clip, updates, tensor_norms_tree(updates)), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def tensor_norms(name: str, leaf: jax.Array) -> jax.Array:
    """L2 norm of the tensor a leaf holds, float32; of each block's, shape (depth, 1, ...), for a
    stacked leaf."""
    squares = jnp.square(leaf.astype(jnp.float32))
    if stacking.is_stacked_name(name):
        return jnp.sqrt(jnp.sum(squares, axis=tuple(range(1, leaf.ndim)), keepdims=True))
    return jnp.sqrt(jnp.sum(squares))


# Leaves of at most this many elements have their tensor norms summed together (tensor_norms_tree).
SMALL_LEAF_ELEMENTS = 65536


def tensor_norms_tree(tree):
    """`tensor_norms` of every leaf of `tree`, in its structure. The norms of small leaves (biases,
    LayerNorm parameters, their per-block stacks) come from one segmented sum over all of them: a
    reduction of its own for each was a kernel of at most a few hundred threads on a GPU (49 of the
    CIFAR step's 112 such kernels, compiled for an H100: docs/benchmarks.md)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    norms: list = [None] * len(leaves)
    pieces, segment_ids, spans, count = [], [], [], 0
    for index, (path, leaf) in enumerate(leaves):
        name = path_name(path)
        if leaf.size > SMALL_LEAF_ELEMENTS:
            norms[index] = tensor_norms(name, leaf)
            continue
        tensors = leaf.shape[0] if stacking.is_stacked_name(name) else 1
        pieces.append(jnp.square(leaf.astype(jnp.float32)).reshape(-1))
        segment_ids.append(np.repeat(np.arange(count, count + tensors), leaf.size // tensors))
        spans.append((index, count, tensors, stacking.is_stacked_name(name), leaf.ndim))
        count += tensors
    if pieces:
        sums = jax.ops.segment_sum(
            jnp.concatenate(pieces),
            jnp.asarray(np.concatenate(segment_ids), jnp.int32),
            num_segments=count,
            indices_are_sorted=True,
        )
        for index, start, tensors, stacked, ndim in spans:
            norm = jnp.sqrt(sums[start : start + tensors])
            norms[index] = norm.reshape((tensors,) + (1,) * (ndim - 1)) if stacked else norm[0]
    return jax.tree_util.tree_unflatten(treedef, norms)


class HoldState(NamedTuple):
    count: jax.Array
    inner_state: Any


def hold_for(num_steps: int, inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """Makes no update and keeps `inner`'s state untouched for the first `num_steps` calls.

    This is the reference's `cancel_gradients_last_layer`: setting `grad = None` makes PyTorch skip
    the tensor entirely (no moment update, no weight decay), which zeroing the gradient would not.
    """

    def init_fn(params):
        return HoldState(count=jnp.zeros([], jnp.int32), inner_state=inner.init(params))

    def update_fn(updates, state, params=None):
        new_updates, new_inner = inner.update(updates, state.inner_state, params)
        held = state.count < num_steps
        new_updates = jax.tree.map(lambda u: jnp.where(held, jnp.zeros_like(u), u), new_updates)
        new_inner = jax.tree.map(lambda new, old: jnp.where(held, old, new), new_inner, state.inner_state)
        return new_updates, HoldState(count=optax.safe_increment(state.count), inner_state=new_inner)

    return optax.GradientTransformation(init_fn, update_fn)


def scale_by_torch_adam(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
) -> optax.GradientTransformation:
    """Adam's direction exactly as torch.optim.AdamW computes it.

    optax's `scale_by_adam` forms the bias correction `1 - b2**t` in float32, where 0.999 rounds
    to 0.99900001: its first steps come out ~7e-6 (relative) smaller than PyTorch's, which does
    this arithmetic in Python floats. Here `b**t = exp(t * log(b))` with `log(b)` taken in float64,
    and the update is arranged as PyTorch's `(m / bc1) / (sqrt(v) / sqrt(bc2) + eps)`. The state
    is optax's `ScaleByAdamState`, so tools that read Adam moments keep working.
    """
    log_b1, log_b2 = math.log(b1), math.log(b2)

    def init_fn(params):
        zeros = lambda: jax.tree.map(jnp.zeros_like, params)  # noqa: E731
        return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=zeros(), nu=zeros())

    def update_fn(updates, state, params=None):
        del params
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g), state.nu, updates)
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        bias_correction1 = -jnp.expm1(t * log_b1)
        sqrt_bias_correction2 = jnp.sqrt(-jnp.expm1(t * log_b2))
        new_updates = jax.tree.map(
            lambda m, v: (m / bias_correction1) / (jnp.sqrt(v) / sqrt_bias_correction2 + eps), mu, nu
        )
        return new_updates, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


def adamw(
    lr_fn: Callable, weight_decay_fn: Callable, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
) -> optax.GradientTransformation:
    """PyTorch AdamW: decoupled decay `theta -= lr * wd * theta`, both following their schedules.

    The decay mask is a function of the parameters it is given, because inside `multi_transform`
    each group sees a tree where the other groups' leaves are masked out.
    """
    return optax.chain(
        scale_by_torch_adam(b1=b1, b2=b2, eps=eps),
        optax.add_decayed_weights(weight_decay_fn, mask=decay_mask),
        optax.scale_by_learning_rate(lr_fn),
    )


def make_optimizer(
    *,
    lr_fn: Callable[[jax.Array], jax.Array],
    weight_decay_fn: Callable[[jax.Array], jax.Array],
    clip_grad: float,
    freeze_last_layer_steps: int,
    norm_last_layer: bool,
) -> optax.GradientTransformation:
    """The student's optimiser. `lr_fn`/`weight_decay_fn` map the global step to a value."""

    def shifted(fn):
        return lambda count: fn(count + freeze_last_layer_steps)

    groups = {
        GROUP_MAIN: adamw(lr_fn, weight_decay_fn),
        GROUP_LAST_LAYER: hold_for(freeze_last_layer_steps, adamw(shifted(lr_fn), shifted(weight_decay_fn))),
        GROUP_FIXED: optax.set_to_zero(),
    }
    labels = lambda tree: param_labels(tree, norm_last_layer=norm_last_layer)  # noqa: E731
    chain = [optax.multi_transform(groups, labels)]
    if clip_grad > 0:
        chain.insert(0, clip_by_tensor_norm(clip_grad))
    return optax.chain(*chain)


def set_schedule_step(opt_state, step, freeze_last_layer_steps: int):
    """`make_optimizer`'s state with its step counters at global `step` (a resume from another
    trainer, or a float16 step the train step skipped; `step` may be traced): the main group's
    schedules at `step`, the held last layer's hold counter at `step` and its own schedules at
    `step - freeze` (they start when the freeze ends). Adam's own counts are left as they are
    (they follow each parameter's updates, like PyTorch's).

    "Schedules" are every state that is a counter alone: the learning rate's
    (`ScaleByScheduleState`) and the weight decay's (optax keeps that one in a private state class
    of `add_decayed_weights`, also a NamedTuple of just `count`); Adam's and the hold's own counts
    sit beside other fields and are left alone."""

    def is_schedule_counter(node) -> bool:
        return isinstance(node, tuple) and getattr(node, "_fields", None) == ("count",)

    def set_schedules(tree, count):
        return jax.tree.map(
            lambda n: n._replace(count=jnp.asarray(count, n.count.dtype)) if is_schedule_counter(n) else n,
            tree,
            is_leaf=is_schedule_counter,
        )

    clip_state, partition = opt_state if len(opt_state) == 2 else (None, opt_state[0])
    inner = dict(partition.inner_states)
    inner[GROUP_MAIN] = set_schedules(inner[GROUP_MAIN], step)
    held = inner[GROUP_LAST_LAYER].inner_state
    held = HoldState(
        count=jnp.asarray(step, held.count.dtype),
        inner_state=set_schedules(held.inner_state, jnp.maximum(0, step - freeze_last_layer_steps)),
    )
    inner[GROUP_LAST_LAYER] = inner[GROUP_LAST_LAYER]._replace(inner_state=held)
    partition = partition._replace(inner_states=inner)
    return (clip_state, partition) if len(opt_state) == 2 else (partition,)


def ema(teacher, student, momentum: jax.Array):
    """The teacher update after each step: `teacher * m + (1 - m) * student`, every parameter."""
    return jax.tree.map(lambda t, s: t * momentum + (1 - momentum) * s, teacher, student)
