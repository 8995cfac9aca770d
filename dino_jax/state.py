"""The train state: student and teacher parameters of one graphdef, optimiser state, center.

The networks are Flax NNX modules used functionally: `nnx.split` gives one `graphdef` (the
structure, static) and parameter pytrees; student and teacher are two such pytrees, so the EMA is a
`jax.tree.map` and the whole state is an ordinary pytree that jit, sharding and orbax handle.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from dino_jax import loss_scale as loss_scale_lib


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: steps taken
    student: Any  # parameter pytree (nnx.State)
    teacher: Any
    opt_state: Any
    center: jax.Array  # (1, out_dim) EMA of the teacher's raw logits
    rng: jax.Array  # base key; step t uses fold_in(rng, t), so nothing random is threaded
    loss_scale: Any = None  # loss_scale.LossScale under float16 compute, else None


def split_model(model: nnx.Module):
    """-> (graphdef, params). All state of our modules is parameters (no RNG or batch stats)."""
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, params


def create_train_state(
    build_model,
    tx,
    *,
    out_dim: int,
    seed: int,
    mesh,
    compute_dtype: str = "float32",
    abstract: bool = False,
) -> tuple[Any, TrainState]:
    """Builds the state directly on the mesh, replicated: `build_model(rngs)` runs under jit with
    `out_shardings`, so parameters never sit on one device first.

    The teacher starts as a copy of the student (the reference's `load_state_dict`). With
    `abstract`, the state is only its shapes (`jax.ShapeDtypeStruct`s carrying their shardings) and
    nothing is computed: what compiling the step for a device that is not here needs
    (`bench/gpu_aot.py`).
    """
    from dino_jax import sharding

    key = jax.random.key(seed)
    init_key, run_key = jax.random.split(key)
    graphdef, _ = split_model(nnx.eval_shape(lambda: build_model(nnx.Rngs(0))))

    def init():
        _, params = split_model(build_model(nnx.Rngs(init_key)))
        return TrainState(
            step=jnp.zeros([], jnp.int32),
            student=params,
            teacher=jax.tree.map(jnp.copy, params),
            opt_state=tx.init(params),
            center=jnp.zeros((1, out_dim), jnp.float32),
            rng=run_key,
            loss_scale=loss_scale_lib.initial(compute_dtype),
        )

    shapes = jax.eval_shape(init)
    shardings = jax.tree.map(lambda _: sharding.replicated(mesh), shapes)
    if abstract:
        return graphdef, jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings
        )
    state = jax.jit(init, out_shardings=shardings)()
    return graphdef, state
