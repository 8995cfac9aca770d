"""The device mesh and how arrays are laid out on it.

One 1-D mesh axis, `data`, over every device of every host: the batch is split along it and the
train state is replicated. Under jit, a mean over the batch axis is then the cross-device mean, so
no collective is written by hand.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices=None) -> jax.sharding.Mesh:
    """A 1-D mesh over `devices` (default: all devices of all hosts).

    Axis type Auto: the model carries no sharding annotations and XLA propagates the batch
    sharding through it; with Explicit axes, ops that mix the sharded batch with replicated
    parameters (the CLS-token concatenation) would be type errors.
    """
    devices = list(devices) if devices is not None else jax.devices()
    return jax.sharding.Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def batch_sharding(mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def to_global_batch(local_batch, mesh):
    """Host-local numpy rows -> global arrays sharded on `data` (each host contributes its rows)."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
    )
