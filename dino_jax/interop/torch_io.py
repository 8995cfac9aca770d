"""PyTorch checkpoint files in and out: `.pth` (unpickled weights-only: a pickle that holds code is
refused, never run) and `.safetensors` (no torch needed), as nested dicts of numpy arrays.

torch itself is imported only to read or write `.pth` files.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

TORCH_SUFFIXES = (".pth", ".safetensors")


class CheckpointFormatError(ValueError):
    """A checkpoint path of a kind we do not read or write, or a checkpoint whose keys or shapes
    are not those of a model we can build."""


class UnsafeCheckpointError(CheckpointFormatError):
    """A `.pth` file's pickle refers to code, which a weights-only load refuses to run."""


def to_numpy(value: Any) -> Any:
    """Tensors -> numpy (float tensors of other precisions -> float32); containers recursively."""
    import torch

    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu()
        if tensor.is_floating_point() and tensor.dtype not in (torch.float32, torch.float64):
            tensor = tensor.float()
        return tensor.numpy()
    if isinstance(value, Mapping):
        return {key: to_numpy(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_numpy(item) for item in value)
    if isinstance(value, argparse.Namespace):
        return {key: to_numpy(item) for key, item in vars(value).items()}
    return value


def _reference_safe_globals() -> list:
    """Plain-data classes the reference's checkpoint.pth holds besides tensors: its options
    (argparse.Namespace) and the numpy float scalars that its numpy schedules leave in the
    optimizer's param_groups (`lr`, `weight_decay`). None of them can run code when rebuilt."""
    scalar = getattr(getattr(np, "_core", np.core), "multiarray").scalar
    dtype_classes = [
        type(np.dtype(name)) for name in ("float16", "float32", "float64", "int32", "int64", "bool")
    ]
    return [argparse.Namespace, scalar, np.dtype, *dtype_classes]


def _check_readable(path: str) -> None:
    """A FileNotFoundError, IsADirectoryError or PermissionError that names the checkpoint, before
    torch or safetensors say it their way."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"checkpoint {path} is a folder; expected a .pth or .safetensors file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with open(path, "rb"):
            pass
    except PermissionError as error:
        raise PermissionError(f"checkpoint {path} cannot be read: permission denied") from error


def _damaged(path: str) -> CheckpointFormatError:
    kind = "safetensors" if path.endswith(".safetensors") else "PyTorch"
    return CheckpointFormatError(
        f"{path} cannot be read as a {kind} checkpoint: the file is truncated, damaged or in another format"
    )


def read_checkpoint_file(path: str) -> dict[str, Any]:
    """Reads a `.pth` (weights-only unpickling) or `.safetensors` file into nested dicts of numpy.

    A training checkpoint's `args` (an argparse.Namespace) becomes a dict. A `.safetensors` file
    whose keys start with `student.`, `teacher.` or `dino_loss.` is nested under those names.
    """
    _check_readable(path)
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            flat = load_file(path)
        except SafetensorError as error:
            raise _damaged(path) from error
        nested: dict[str, Any] = {}
        for key, value in flat.items():
            top, _, rest = key.partition(".")
            if top in ("student", "teacher", "dino_loss") and rest:
                nested.setdefault(top, {})[rest] = value
            else:
                nested[key] = value
        return nested
    import torch

    try:
        with torch.serialization.safe_globals(_reference_safe_globals()):
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        with open(path, "rb") as f:
            is_pickle = f.read(1) == b"\x80"  # a bare pickle (protocol 2+) rather than torch's zip
        if found is None and not is_pickle:
            raise _damaged(path) from error
        what = f"'{found.group(1)}'" if found else "code or objects"
        raise UnsafeCheckpointError(
            f"refused to load {path}: its pickle refers to {what}, which a weights-only load does not "
            f"allow, and this loader never runs code from a checkpoint. If you trust the file, re-save "
            f"just its tensors (a state dict) or convert it to .safetensors"
        ) from error
    except (RuntimeError, EOFError, KeyError, ValueError) as error:
        # What torch.load raises on a truncated zip, an empty file or bytes of another format.
        raise _damaged(path) from error
    if not isinstance(raw, Mapping):
        raise CheckpointFormatError(
            f"{path} holds a {type(raw).__name__}; expected a dict (a state dict or a training "
            f"checkpoint with 'student'/'teacher')"
        )
    return to_numpy(raw)


def save_checkpoint_file(tree: Mapping[str, Any], path: str) -> None:
    """Writes nested dicts of numpy arrays as `.pth` (torch tensors) or `.safetensors` (flat keys
    joined with '.', the form `read_checkpoint_file` reads back)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".safetensors"):
        from safetensors.numpy import save_file

        flat = {}
        for key, value in tree.items():
            if isinstance(value, Mapping):
                flat.update(
                    {
                        f"{key}.{name}": np.ascontiguousarray(v)
                        for name, v in value.items()
                        if isinstance(v, np.ndarray)
                    }
                )
            elif isinstance(value, np.ndarray):
                flat[key] = np.ascontiguousarray(value)
        save_file(flat, path)
        return
    if not path.endswith(".pth"):
        raise CheckpointFormatError(f"unknown checkpoint type {path!r}; expected a .pth or .safetensors file")
    import torch

    def to_torch(value):
        if isinstance(value, np.ndarray):
            return torch.tensor(np.asarray(value))
        if isinstance(value, Mapping):
            return {key: to_torch(item) for key, item in value.items()}
        return value

    torch.save(to_torch(tree), path)
