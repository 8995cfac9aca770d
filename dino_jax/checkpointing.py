"""Orbax checkpoints: the train state together with the grain iterator, and single pytrees.

Everything orbax-specific lives here, so a later move to the orbax v1 API touches one file.
A training checkpoint holds two items: `state` (the TrainState pytree) and `data` (the iterator
position), so a resumed run sees exactly the batches an uninterrupted one would. `save_item` and
`restore_item` write and read one item without a target (a converted checkpoint's `params`, a
training run's `state` read by a loader that builds the model from the run's config).

What survives what:
- A process killed at any moment (SIGKILL, a crash, a lost VM): orbax writes a step into
  `<step>.orbax-checkpoint-tmp` and renames it to `<step>` only when every file is written, so a
  directory named by a step is complete; an unfinished one is removed when the next run opens the
  directory.
- A latest checkpoint damaged afterwards (a truncated copy, a bad disk): `Checkpointer.restore`
  names it, moves it aside to `<step>.damaged` and restores the newest one that reads.
- A checkpoint of another model: refused, naming the parameters whose shapes differ.
- A failed write (a full disk): the unfinished step is removed, the earlier steps are untouched,
  and the error says which ones are kept.
- Another number of processes (docs/multihost.md): the state is written collectively (each array
  once, whatever the hosts) and restores onto any mesh; the iterator position is a file per
  process, and the training stream's position (batches taken) is the same in every layout, so a
  run resumes on another number of hosts. A position that does depend on the layout (grain worker
  processes, `augment.num_workers > 0`) is refused with a message saying so.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import shutil
import sys
import traceback
from typing import Any, Callable

import grain
import jax
import orbax.checkpoint as ocp

from dino_jax.models import stacking

# Where orbax writes a step before renaming it to `<step>` (orbax's atomic-rename commit).
_UNFINISHED_SUFFIX = ".orbax-checkpoint-tmp"
DAMAGED_SUFFIX = ".damaged"
# How tensorstore (which writes the arrays) reports a failed write: a ValueError whose text ends
# with e.g. "No space left on device [os_error_code='28']".
_OS_ERROR_CODE = "os_error_code="


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or was written for another model or config, or could not
    be written."""


def _print(*args):
    print(*args, file=sys.stderr, flush=True)


class DataIteratorHandler(grain.checkpoint.CheckpointHandler):
    """grain's handler (a `process_<i>-of-<n>.json` per process), which also restores a position
    saved by another number of processes when it does not depend on the number (module doc)."""

    def restore(self, directory, item=None, args=None):
        item = item or args.item
        own = directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if own.exists():
            return super().restore(directory, item=item, args=args)
        saved = sorted(directory.glob("process_*-of-*.json"))
        states = [json.loads(path.read_text()) for path in saved]
        if not states:
            raise CheckpointError(f"{directory} holds no data-iterator position")
        # A bare batch position: host h's k-th batch is rows [h*b, (h+1)*b) of global batch k in
        # any layout (data/pipeline.py), so k is all there is to restore.
        if any(state != states[0] for state in states) or set(states[0]) != {"next_index"}:
            raise CheckpointError(
                f"the data-iterator position in {directory} was saved by {saved[0].stem.split('-of-')[1]} "
                f"process(es) and depends on that layout (grain worker processes: augment.num_workers > 0), "
                f"so it cannot be restored by {jax.process_count()}. Resume with the same number of "
                "processes, or with augment.num_workers=0 on both sides"
            )
        item.set_state(states[0])
        item.start_prefetch()
        return item


# orbax picks a handler by the type of the args it is given: these select DataIteratorHandler.
@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataRestore(ocp.args.CheckpointArgs):
    item: Any


class Checkpointer:
    def __init__(self, directory: str, *, max_to_keep: int = 2, save_every_steps: int = 1000):
        _quiet_closed_event_loop_noise()
        self.directory = os.path.abspath(directory)
        # Steps a stopped run was still writing; orbax removes them as it opens the directory.
        self.unfinished: list[str] = sorted(
            os.path.join(self.directory, name)
            for name in (os.listdir(self.directory) if os.path.isdir(self.directory) else ())
            if _UNFINISHED_SUFFIX in name
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                save_interval_steps=save_every_steps,
                create=True,
                cleanup_tmp_directories=True,
            ),
            # Handlers rather than bare item names: reading a step's metadata (the stored shapes)
            # needs them before anything was saved or restored.
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": DataIteratorHandler(),
            },
        )
        self._writing: int | None = None  # the step of a save that may still be in flight

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state, data_iterator=None, *, force: bool = False) -> bool:
        """Starts writing `step` (orbax writes in the background; `wait` or the next `save` waits
        for it). Raises CheckpointError when a write fails (the disk is full, ...): the failed step
        is removed and every earlier one kept."""
        self.wait()  # a failed previous write is reported as that step's failure
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = DataSave(data_iterator)
        try:
            started = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
        except Exception as error:
            self._raise_if_write_failed(step, error)
            raise
        if started:
            self._writing = step
        return started

    def wait(self) -> None:
        """Waits until the checkpoint being written is complete."""
        try:
            self._manager.wait_until_finished()
        except Exception as error:
            self._raise_if_write_failed(self._writing, error)
            raise
        self._writing = None

    def _raise_if_write_failed(self, step: int | None, error: Exception) -> None:
        """Raises CheckpointError when `error` is the file system refusing a write (OSError, or
        tensorstore's ValueError carrying an OS error code), after removing the unfinished step."""
        if not (isinstance(error, OSError) or _OS_ERROR_CODE in str(error)):
            return
        self._writing = None
        for name in os.listdir(self.directory):
            if _UNFINISHED_SUFFIX in name:  # the failed step's files: they may be what filled the disk
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
        self._manager.reload()
        kept = self.all_steps()
        if kept:
            outcome = (
                f"the checkpoint of step {kept[-1]} is intact (steps kept: {', '.join(map(str, kept))}); "
                f"rerun the same command to continue from step {kept[-1]}"
            )
        else:
            outcome = "there is no earlier checkpoint; rerun the same command to start again"
        if _is_disk_full(error):
            raise CheckpointError(
                f"the disk is full: checkpoint step {step} could not be written to {self.directory}; "
                f"{outcome} once there is space"
            ) from error
        raise CheckpointError(
            f"checkpoint step {step} could not be written to {self.directory} ({_brief(error)}); {outcome}"
        ) from error

    def restore(self, abstract_state, data_iterator=None, step: int | None = None, *, log: Callable = _print):
        """Restores onto `abstract_state`'s shapes and shardings (and the iterator in place).

        `step=None`: the newest checkpoint that reads. One that does not (truncated, corrupted) is
        reported through `log`, by name, and moved aside to `<step>.damaged` once an older one has
        restored. Raises CheckpointError, naming the directory, when there is nothing to restore,
        no checkpoint reads, or the stored tree is another model's (naming the parameters whose
        shapes differ).
        """
        steps = self.all_steps() if step is None else [step]
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        damaged: list[tuple[int, str]] = []
        for candidate in reversed(steps):
            stored_per_block = self._check_same_tree(candidate, abstract_state)
            target = abstract_state
            if stored_per_block:  # written before the ViT's blocks were stacked: read as it is stored
                target = _as_stored(self._manager.item_metadata(candidate)["state"], abstract_state)
            items = {"state": ocp.args.StandardRestore(target)}
            if data_iterator is not None:
                items["data"] = DataRestore(data_iterator)
            try:
                state = self._manager.restore(candidate, args=ocp.args.Composite(**items))["state"]
            except CheckpointError:  # readable, but not by this layout: not damage
                raise
            except Exception as error:  # orbax and tensorstore raise many types for unreadable files
                damaged.append((candidate, _brief(error)))
                continue
            if stored_per_block:
                state = _stack_blocks_into(abstract_state, state)
            for bad_step, reason in damaged:
                moved = self._set_aside(bad_step)
                log(
                    f"checkpoint {self._step_path(bad_step)} is damaged (truncated or corrupted: "
                    f"{reason}); moved it to {moved} and restored step {candidate} instead"
                )
            return state
        raise CheckpointError(
            f"no checkpoint in {self.directory} can be read: "
            + "; ".join(f"step {bad_step}: {reason}" for bad_step, reason in damaged)
        )

    def _step_path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def _check_same_tree(self, step: int, abstract_state) -> bool:
        """Raises CheckpointError when `step` stores other parameters or shapes than
        `abstract_state` has. Unreadable metadata is left to the restore (damage, not a foreign
        model). True when it stores them with the ViT's blocks one by one (`blocks.3.attn...`, as
        checkpoints written before the blocks were stacked, models/stacking.py)."""
        try:
            stored = self._manager.item_metadata(step)["state"]
        except Exception:  # unreadable: the restore reports it as damage
            return False
        if stored is None:
            return False
        stored_shapes, expected = _shapes(stored), _shapes(abstract_state)
        if stored_shapes != expected and stored_shapes == _per_block_shapes(expected):
            return True
        differences = _tree_differences(stored_shapes, expected)
        if differences:
            raise CheckpointError(
                f"checkpoint {self._step_path(step)} was written for another model than this config "
                f"describes; the shapes that differ (checkpoint -> this config): {differences}. Use a "
                "new --workdir, or the config this workdir was trained with (its config.json)"
            )
        return False

    def _set_aside(self, step: int) -> str:
        target = self._step_path(step) + DAMAGED_SUFFIX
        suffix = 1
        while os.path.exists(target):
            suffix += 1
            target = f"{self._step_path(step)}{DAMAGED_SUFFIX}{suffix}"
        if jax.process_index() == 0:
            os.rename(self._step_path(step), target)
        self._manager.reload()
        return target

    def close(self) -> None:
        self.wait()
        self._manager.close()


def abstract_like(state: Any):
    """Shape/dtype/sharding skeleton of `state`, the target a restore fills in."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


def _name(path) -> str:
    parts = [str(getattr(key, "key", getattr(key, "idx", getattr(key, "name", key)))) for key in path]
    return ".".join(parts[:-1] if parts and parts[-1] == "value" else parts)


def _shapes(tree) -> dict[str, tuple[int, ...]]:
    """`{"student.backbone.cls_token": (1, 1, 192), ...}` of a state, its abstract skeleton or the
    metadata orbax stored for it (the names are the same in all three)."""
    return {_name(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _per_block_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """`_shapes` with stacked parameters named one block at a time (`...blocks.3.attn...`)."""
    split = stacking.per_block_shapes({tuple(name.split(".")): shape for name, shape in shapes.items()})
    return {".".join(map(str, path)): shape for path, shape in split.items()}


def _as_stored(metadata, abstract_state):
    """A restore target of the stored tree's own structure, on the state's (replicated) sharding."""
    sharding = jax.tree.leaves(abstract_state)[0].sharding
    return jax.tree.map(
        lambda meta: jax.ShapeDtypeStruct(meta.shape, meta.dtype, sharding=sharding), metadata
    )


def _stack_blocks_into(abstract_state, restored):
    """`abstract_state`'s structure filled from a restored per-block tree, blocks stacked."""
    flat = {
        tuple(_name(path).split(".")): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(restored)[0]
    }
    by_name = {".".join(path): leaf for path, leaf in stacking.stacked(flat).items()}

    def fill(path, like):
        value = by_name[_name(path)]
        if jax.dtypes.issubdtype(getattr(value, "dtype", None) or like.dtype, jax.dtypes.prng_key):
            return value  # the run's key, restored as a key
        return jax.device_put(jax.numpy.asarray(value, like.dtype), like.sharding)

    return jax.tree_util.tree_map_with_path(fill, abstract_state)


def _tree_differences(stored: dict, expected: dict, shown: int = 6) -> str:
    """`name (checkpoint's shape) -> (this config's)` for the first `shown` parameters that
    differ: the student's (the teacher and the optimiser's moments repeat them), the least nested
    first (the embeddings show a model's width at a glance)."""
    names = [name for name in set(stored) | set(expected) if stored.get(name) != expected.get(name)]
    names.sort(key=lambda name: (not name.startswith("student."), name.count("."), name))
    differences = [f"{name} {stored.get(name, 'none')} -> {expected.get(name, 'none')}" for name in names]
    more = len(differences) - shown
    return ", ".join(differences[:shown]) + (f" (and {more} more)" if more > 0 else "")


def _is_disk_full(error: BaseException) -> bool:
    codes = (errno.ENOSPC, errno.EDQUOT)
    if isinstance(error, OSError):
        return error.errno in codes
    return any(f"{_OS_ERROR_CODE}'{code}'" in str(error) for code in codes)


def _brief(error: BaseException, limit: int = 300) -> str:
    """One line of an orbax/tensorstore error: without the tensorstore spec that follows the
    reason, and its end (the file and what was wrong with it) when it is long."""
    text = str(error).split(" [tensorstore_spec")[0].strip().splitlines()
    text = text[0] if text else ""
    if len(text) > limit:
        text = "..." + text[-limit:]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class _DropOrbaxOrphanTaskErrors(logging.Filter):
    """asyncio logs "Task exception was never retrieved" or "Future exception was never retrieved"
    (with a traceback) for each of orbax's parallel reads that failed after the first failure was
    raised; the first is reported. Recognised by the error (tensorstore names its spec) or by a
    frame in orbax."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if "exception was never retrieved" not in message or not record.exc_info:
            return True
        error = record.exc_info[1]
        if "tensorstore_spec" in str(error):
            return False
        frames = traceback.extract_tb(record.exc_info[2]) if record.exc_info[2] else []
        return not any(f"{os.sep}orbax{os.sep}" in frame.filename for frame in frames)


def _quiet_closed_event_loop_noise() -> None:
    """When a read or write fails inside orbax (a damaged checkpoint, a full disk), orbax closes
    its event loop while tensorstore finishes the other reads or writes, and each of them reports
    "Event loop is closed" through `sys.unraisablehook`, or asyncio logs it as a task exception
    never retrieved: a screen of harmless tracebacks around the one message that matters. From the
    first use of orbax on, this drops those, and only those."""
    asyncio_logger = logging.getLogger("asyncio")
    if not any(isinstance(f, _DropOrbaxOrphanTaskErrors) for f in asyncio_logger.filters):
        asyncio_logger.addFilter(_DropOrbaxOrphanTaskErrors())
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_event_loop_noise", False):
        return

    def hook(unraisable):
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            previous(unraisable)

    hook.drops_closed_event_loop_noise = True
    sys.unraisablehook = hook


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
    arrays with no target to match, each on this process's first device (whatever the devices and
    processes that wrote it); raises CheckpointError when there is none or it is corrupt."""
    directory = os.path.abspath(directory)
    if not os.path.isdir(directory):
        raise CheckpointError(f"no checkpoint in {directory}")
    _quiet_closed_event_loop_noise()
    # The data handler too, which is not read: without it orbax warns that a training checkpoint's
    # `data` item cannot be restored.
    handlers = {"data": DataIteratorHandler(), item: ocp.StandardCheckpointHandler()}
    manager = ocp.CheckpointManager(directory, item_handlers=handlers)
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {directory}")
        try:
            # The stored shapes on one local device: without a target, orbax would restore onto the
            # writer's device layout, which fails on any other number of devices or processes.
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            target = jax.tree.map(
                lambda meta: jax.ShapeDtypeStruct(meta.shape, meta.dtype, sharding=device),
                manager.item_metadata(step)[item],
            )
            restored = manager.restore(
                step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(target)})
            )
        except Exception as error:  # orbax raises many types for a bad or foreign checkpoint
            raise CheckpointError(
                f"cannot restore step {step} from {directory}: it is damaged, or holds no {item!r} "
                f"({_brief(error)})"
            ) from error
        return restored[item], step
    finally:
        manager.close()
