"""Orbax checkpoints: the train state together with the grain iterator, and single pytrees.

Everything orbax-specific lives here, so a later move to the orbax v1 API touches one file.
A training checkpoint holds two items: `state` (the TrainState pytree) and `data` (the iterator
position), so a resumed run sees exactly the batches an uninterrupted one would. `save_item` and
`restore_item` write and read one item without a target (a converted checkpoint's `params`, a
training run's `state` read by a loader that builds the model from the run's config).
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or was written for another model or config."""


class Checkpointer:
    def __init__(self, directory: str, *, max_to_keep: int = 2, save_every_steps: int = 1000):
        self.directory = os.path.abspath(directory)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, save_interval_steps=save_every_steps, create=True
            ),
            item_names=("state", "data"),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state, data_iterator=None, *, force: bool = False) -> bool:
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, abstract_state, data_iterator=None, step: int | None = None):
        """Restores onto `abstract_state`'s shapes and shardings (and the iterator in place).

        Raises CheckpointError naming the directory when there is nothing to restore or the stored
        tree does not match the model the config describes.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        return _restore(self._manager, step, items, self.directory)["state"]

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_like(state: Any):
    """Shape/dtype/sharding skeleton of `state`, the target a restore fills in."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


def _restore(manager: ocp.CheckpointManager, step: int, items: dict, directory: str) -> dict:
    try:
        return manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as error:  # orbax raises many types for a bad or foreign checkpoint
        raise CheckpointError(
            f"cannot restore step {step} from {directory}: it is corrupt or was written for "
            f"another model/config ({type(error).__name__}: {str(error)[:500]})"
        ) from error


def save_item(directory: str, item: str, tree: Any, *, step: int = 0) -> None:
    """Writes `tree` as item `item` of step `step` in `directory` (created if missing)."""
    manager = ocp.CheckpointManager(
        os.path.abspath(directory), item_names=(item,), options=ocp.CheckpointManagerOptions(create=True)
    )
    manager.save(step, args=ocp.args.Composite(**{item: ocp.args.StandardSave(tree)}), force=True)
    manager.wait_until_finished()
    manager.close()


def restore_item(directory: str, item: str, step: int | None = None) -> tuple[Any, int]:
    """`(tree, step)`: item `item` of `step` (default: the latest) as stored, nested dicts of
    arrays with no target to match; raises CheckpointError when there is none or it is corrupt."""
    directory = os.path.abspath(directory)
    if not os.path.isdir(directory):
        raise CheckpointError(f"no checkpoint in {directory}")
    manager = ocp.CheckpointManager(directory, item_names=(item,))
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {directory}")
        return _restore(manager, step, {item: ocp.args.StandardRestore()}, directory)[item], step
    finally:
        manager.close()
