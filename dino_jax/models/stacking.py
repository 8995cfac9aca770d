"""A stack of identical modules kept as one: each parameter carries a leading axis, one entry per
module (`blocks.attn.qkv.kernel` is (depth, D, 3D)). The ViT's blocks are stored this way.

Why: the optimiser, the EMA, the gradient clipping and the norms then touch ~25 tensors instead of
~150, and on a GPU each tensor's update and reduction is a kernel of its own (the CIFAR step's
optimiser launched 617 kernels over per-block tensors and 129 over stacked ones, compiled for an
H100: docs/benchmarks.md); the blocks can also run as a `lax.scan` over the stack.

What reads or writes parameters by block (the PyTorch key tables, checkpoints written before the
stack) goes through the per-block view here: `blocks.3.attn.qkv.kernel` is entry 3 of
`blocks.attn.qkv.kernel`. Initialisation builds the modules one by one as before and stacks them,
so a seed gives the same parameters in either layout.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

STACKED = "blocks"  # the path component under which parameters are stacked


def stack(modules: Sequence[nnx.Module]) -> nnx.Module:
    """One module of `modules[0]`'s structure whose arrays stack theirs along a new axis 0."""
    graphdef, _ = nnx.split(modules[0])
    states = [nnx.split(module)[1] for module in modules]
    return nnx.merge(graphdef, jax.tree.map(lambda *arrays: jnp.stack(arrays), *states))


def at(stacked: nnx.Module, index) -> nnx.Module:
    """Module `index` of a stack (a new module holding slices; writing to it leaves the stack as is)."""
    graphdef, state = nnx.split(stacked)
    return nnx.merge(graphdef, jax.tree.map(lambda array: array[index], state))


def _is_int(key) -> bool:
    return isinstance(key, int) or (isinstance(key, str) and key.isdigit())


def stack_position(path: Sequence) -> int | None:
    """Index in `path` of the stacked component of a stacked parameter's path (the next key is not
    a block number), else None. Keys may be strings, ints or jax path entries."""
    keys = [getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path]
    for position, key in enumerate(keys[:-1]):
        if key == STACKED and not _is_int(keys[position + 1]):
            return position
    return None


def is_stacked_name(name: str) -> bool:
    """Whether a dotted parameter name (`backbone.blocks.attn.qkv.kernel`) is a stacked one."""
    return stack_position(name.split(".")) is not None


def per_block(flat: Mapping[tuple, Any]) -> dict[tuple, Any]:
    """`{path: array}` with stacked paths split into one entry per block: `(..., 'blocks', i, ...)`.
    Arrays are sliced; values without a shape (an abstract spec) need `per_block_shapes`."""
    out = {}
    for path, value in flat.items():
        position = stack_position(path)
        if position is None:
            out[tuple(path)] = value
            continue
        for index in range(value.shape[0]):
            out[tuple(path[: position + 1]) + (index,) + tuple(path[position + 1 :])] = value[index]
    return out


def per_block_shapes(flat_shapes: Mapping[tuple, tuple]) -> dict[tuple, tuple]:
    """`per_block` for `{path: shape}`."""
    out = {}
    for path, shape in flat_shapes.items():
        position = stack_position(path)
        if position is None:
            out[tuple(path)] = tuple(shape)
            continue
        for index in range(shape[0]):
            out[tuple(path[: position + 1]) + (index,) + tuple(path[position + 1 :])] = tuple(shape[1:])
    return out


def stacked(flat: Mapping[tuple, Any], *, xp=jnp) -> dict[tuple, Any]:
    """The inverse of `per_block`: `(..., 'blocks', i, rest)` entries stacked in block order into
    `(..., 'blocks', rest)`. `xp` is the array module that stacks (numpy for host arrays)."""
    out: dict[tuple, Any] = {}
    groups: dict[tuple, dict[int, Any]] = {}
    for path, value in flat.items():
        path = tuple(path)
        position = next(
            (p for p in range(len(path) - 1) if path[p] == STACKED and _is_int(path[p + 1])), None
        )
        if position is None:
            out[path] = value
            continue
        key = path[: position + 1] + path[position + 2 :]
        groups.setdefault(key, {})[int(path[position + 1])] = value
    for key, blocks in groups.items():
        if sorted(blocks) != list(range(len(blocks))):
            raise ValueError(
                f"blocks {sorted(blocks)} of {'.'.join(map(str, key))} are not 0..{len(blocks) - 1}"
            )
        out[key] = xp.stack([blocks[index] for index in range(len(blocks))])
    return out
