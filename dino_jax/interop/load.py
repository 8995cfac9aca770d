"""Any checkpoint as our configs and parameters (`LoadedCheckpoint`), by what its path is:

- a `.pth` or `.safetensors` file: a PyTorch checkpoint (the reference's training checkpoint, a DINO
  state dict, a released backbone or a timm ViT), read by `import_checkpoint`;
- a directory with `model.json`: a PyTorch checkpoint converted by `launch.py --mode=convert`
  (`save_converted`: orbax item `params` holding student/teacher/center, the two model configs in
  `model.json`);
- a directory with `config.json`: a dino_jax training run (the latest step in `checkpoints/`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dino_jax import checkpointing, config as config_lib
from dino_jax.data.normalize import IMAGENET_MEAN, IMAGENET_STD
from dino_jax.interop.torch_convert import abstract_model, backbone_from_torch, dino_from_torch
from dino_jax.interop.torch_io import TORCH_SUFFIXES, CheckpointFormatError, read_checkpoint_file, to_numpy
from dino_jax.interop.torch_keys import has_head
from dino_jax.models import stacking
from dino_jax.models.head import HeadConfig
from dino_jax.models.vit import ViTConfig

CONVERTED_MODEL_FILE = "model.json"


@dataclasses.dataclass
class LoadedCheckpoint:
    """A checkpoint of any supported kind, as our configs and parameters.

    `student`/`teacher` are `DINO` params when there is a head, else `VisionTransformer` params
    (`head_config` None); a backbone-only file fills `teacher` (the reference releases the
    teacher's backbone) and leaves `student` None. `mean`/`std` are the pixel statistics the
    network was trained with (ImageNet's for a PyTorch file, as in the reference); `step` is a
    training run's; `epoch`, `args` and `optimizer` (the torch optimizer state dict, as read) come
    from a reference training checkpoint.
    """

    vit_config: ViTConfig
    head_config: HeadConfig | None
    student: nnx.State | None
    teacher: nnx.State | None
    center: np.ndarray | None = None
    epoch: int | None = None
    args: dict | None = None
    optimizer: dict | None = None
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    step: int | None = None

    def backbone(self, which: str | None = None) -> tuple[nnx.GraphDef, nnx.State]:
        """(graphdef, params) of the ViT of the `which` network, 'teacher' or 'student'; by
        default the teacher, or the student of a checkpoint without one. This is what the
        evaluators, the attention maps and the exporters take."""
        if which is None:
            which = "teacher" if self.teacher is not None else "student"
        params = self.teacher if which == "teacher" else self.student
        if params is None:
            raise CheckpointFormatError(f"the checkpoint holds no {which} network")
        graphdef, _ = abstract_model(dataclasses.replace(self.vit_config, drop_path_rate=0.0))
        return graphdef, params["backbone"] if self.head_config is not None else params


def load_checkpoint(path: str, *, image_size: int | None = None) -> LoadedCheckpoint:
    """Any supported checkpoint (see the module docstring). `image_size` resizes the position
    embedding of a PyTorch checkpoint the way the reference does."""
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, CONVERTED_MODEL_FILE)):
            return load_converted(path)
        if config_lib.has_run_config(path):
            return load_workdir(path)
        raise FileNotFoundError(
            f"{path} is a directory with neither {CONVERTED_MODEL_FILE} (a converted checkpoint) nor "
            f"config.json (a training workdir)"
        )
    if path.endswith(TORCH_SUFFIXES):
        return import_checkpoint(path, image_size=image_size)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    raise CheckpointFormatError(
        f"unknown checkpoint {path!r}: expected a .pth/.safetensors file, a converted "
        f"checkpoint directory or a training workdir"
    )


def _norm_last_layer_from(raw: Mapping[str, Any], default: bool) -> bool:
    args = raw.get("args")
    if isinstance(args, Mapping) and "norm_last_layer" in args:
        return bool(args["norm_last_layer"])
    return default


def import_checkpoint(
    source: str | Mapping[str, Any],
    *,
    image_size: int | None = None,
    num_heads: int | None = None,
    norm_last_layer: bool | None = None,
    dtype: str = "float32",
) -> LoadedCheckpoint:
    """Reads a reference training checkpoint, a full (student or teacher) DINO state dict, or a
    backbone-only/timm ViT state dict, from a path or an already-read dict.

    `norm_last_layer` defaults to the checkpoint's own `args.norm_last_layer`, else True.
    """
    raw = read_checkpoint_file(source) if isinstance(source, str) else to_numpy(source)
    for wrapper in ("state_dict", "model"):  # common containers around a bare state dict
        if (
            wrapper in raw
            and isinstance(raw[wrapper], Mapping)
            and not ("student" in raw or "teacher" in raw)
        ):
            raw = {**raw, **raw[wrapper]}
            del raw[wrapper]
    norm = _norm_last_layer_from(raw, True) if norm_last_layer is None else norm_last_layer
    options = dict(image_size=image_size, num_heads=num_heads, dtype=dtype)
    if "student" in raw or "teacher" in raw:
        nets, configs = {}, None
        for which in ("student", "teacher"):
            if which not in raw:
                continue
            state_dict = raw[which]
            if has_head(state_dict):
                vit_config, head_config, params = dino_from_torch(state_dict, norm_last_layer=norm, **options)
            else:
                (vit_config, params), head_config = backbone_from_torch(state_dict, **options), None
            if configs is not None and configs != (vit_config, head_config):
                raise CheckpointFormatError(
                    f"student and teacher describe different models: {configs} vs {(vit_config, head_config)}"
                )
            configs, nets[which] = (vit_config, head_config), params
        center = raw.get("dino_loss", {}).get("center") if isinstance(raw.get("dino_loss"), Mapping) else None
        epoch = raw.get("epoch")
        return LoadedCheckpoint(
            configs[0],
            configs[1],
            nets.get("student"),
            nets.get("teacher"),
            center=None if center is None else np.asarray(center, np.float32),
            epoch=None if epoch is None else int(epoch),
            args=raw.get("args") if isinstance(raw.get("args"), Mapping) else None,
            optimizer=raw.get("optimizer") if isinstance(raw.get("optimizer"), Mapping) else None,
        )
    tensors = {key: value for key, value in raw.items() if isinstance(value, np.ndarray)}
    if has_head(tensors):
        vit_config, head_config, params = dino_from_torch(tensors, norm_last_layer=norm, **options)
        return LoadedCheckpoint(vit_config, head_config, None, params)
    vit_config, params = backbone_from_torch(tensors, **options)
    return LoadedCheckpoint(vit_config, None, None, params)


def _flat_tree(tree, prefix: tuple = ()) -> dict[tuple, Any]:
    """`{('backbone', 'cls_token'): array, ...}` of a restored nested dict (an nnx Variable's
    array sits under 'value')."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    if set(tree) == {"value"} and not isinstance(tree["value"], dict):
        return {prefix: tree["value"]}
    flat = {}
    for key, child in tree.items():
        flat.update(_flat_tree(child, prefix + (str(key),)))
    return flat


def _params_from_tree(abstract: nnx.State, tree, where: str) -> nnx.State:
    """Fills `abstract` from a restored nested dict. A tree written before the ViT's blocks were
    stacked (`blocks.0.attn...`, one entry per block) is stacked first (models/stacking.py)."""
    flat = stacking.stacked(_flat_tree(tree), xp=np)
    filled = []
    for path, variable in nnx.to_flat_state(abstract):
        key = tuple(str(k) for k in path)
        if key not in flat:
            raise CheckpointFormatError(
                f"{where} has no parameter {'.'.join(key)}; it was written for another model"
            )
        node = flat[key]
        if tuple(node.shape) != tuple(variable.shape):
            raise CheckpointFormatError(
                f"{where}: {'.'.join(key)} has shape {tuple(node.shape)}, expected {tuple(variable.shape)}"
            )
        filled.append((path, variable.replace(jnp.asarray(node, jnp.float32))))
    return nnx.from_flat_state(filled)


def save_converted(model: LoadedCheckpoint, directory: str) -> None:
    """Writes a converted checkpoint: `model.json` and an orbax item `params`."""
    os.makedirs(directory, exist_ok=True)
    description = {
        "vit_config": dataclasses.asdict(model.vit_config),
        "head_config": None if model.head_config is None else dataclasses.asdict(model.head_config),
        "epoch": model.epoch,
        "networks": [name for name in ("student", "teacher") if getattr(model, name) is not None],
    }
    tree = {name: nnx.to_pure_dict(getattr(model, name)) for name in description["networks"]}
    if model.center is not None:
        tree["center"] = np.asarray(model.center, np.float32)
    checkpointing.save_item(directory, "params", tree)
    with open(os.path.join(directory, CONVERTED_MODEL_FILE), "w") as f:
        json.dump(description, f, indent=2)


def load_converted(directory: str) -> LoadedCheckpoint:
    with open(os.path.join(directory, CONVERTED_MODEL_FILE)) as f:
        description = json.load(f)
    vit_config = ViTConfig(**description["vit_config"])
    head = description["head_config"]
    head_config = None if head is None else HeadConfig(**head)
    tree, _ = checkpointing.restore_item(directory, "params")
    _, abstract = abstract_model(vit_config, head_config)
    nets = {
        name: _params_from_tree(abstract, tree[name], f"{directory} ({name})")
        for name in description["networks"]
    }
    center = tree.get("center")
    return LoadedCheckpoint(
        vit_config,
        head_config,
        nets.get("student"),
        nets.get("teacher"),
        center=None if center is None else np.asarray(center),
        epoch=description.get("epoch"),
    )


def load_workdir(workdir: str) -> LoadedCheckpoint:
    """The latest checkpoint of a dino_jax training run, with the configs its config.json gives."""
    config = config_lib.load_run_config(workdir)
    vit_config = config_lib.vit_config(config, drop_path=False)
    head_config = config_lib.head_config(config, vit_config.embed_dim)
    state, step = checkpointing.restore_item(os.path.join(workdir, "checkpoints"), "state")
    _, abstract = abstract_model(vit_config, head_config)
    where = f"{workdir} step {step}"
    return LoadedCheckpoint(
        vit_config,
        head_config,
        student=_params_from_tree(abstract, state["student"], where + " (student)"),
        teacher=_params_from_tree(abstract, state["teacher"], where + " (teacher)"),
        center=np.asarray(state["center"], np.float32),
        mean=tuple(config.dataset.mean),
        std=tuple(config.dataset.std),
        step=step,
    )
