"""What `launch.py --mode=convert` and `--mode=embed` run: plain functions over paths.

Checkpoints these functions read, by what the path is:
- a `.pth` or `.safetensors` file: a PyTorch checkpoint (reference training checkpoint, DINO state
  dict, released backbone or timm ViT), read by `torch_ckpt.import_checkpoint`;
- a directory with `model.json`: a PyTorch checkpoint converted by `convert` (orbax item `params`
  holding student/teacher/center, plus the two model configs in `model.json`);
- a directory with `config.json` and `checkpoints/`: a dino_jax training run (its latest step).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dino_jax.data.image_files import image_files, load_image
from dino_jax.data.normalize import IMAGENET_MEAN, IMAGENET_STD, normalize_images
from dino_jax.interop import torch_ckpt
from dino_jax.models.dino import DINO
from dino_jax.models.head import HeadConfig
from dino_jax.models.vit import ViTConfig, VisionTransformer

TORCH_SUFFIXES = (".pth", ".safetensors")
CONVERTED_MODEL_FILE = "model.json"


@dataclasses.dataclass
class LoadedCheckpoint:
    """A checkpoint of any supported kind, as our configs and parameters; `mean`/`std` are the
    pixel statistics its network was trained with."""

    model: torch_ckpt.ImportedCheckpoint
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    step: int | None = None


def _abstract_params(vit_config: ViTConfig, head_config: HeadConfig | None):
    if head_config is None:
        build = lambda: VisionTransformer(vit_config, rngs=nnx.Rngs(0))  # noqa: E731
    else:
        build = lambda: DINO(vit_config, head_config, rngs=nnx.Rngs(0))  # noqa: E731
    return nnx.split(nnx.eval_shape(build))[1]


def _params_from_tree(abstract: nnx.State, tree, where: str) -> nnx.State:
    """Fills `abstract` from a restored nested dict (keys are strings, leaves under 'value')."""
    flat = []
    for path, variable in nnx.to_flat_state(abstract):
        node = tree
        for key in tuple(str(k) for k in path):
            if not isinstance(node, dict) or key not in node:
                raise torch_ckpt.CheckpointFormatError(
                    f"{where} has no parameter {'.'.join(map(str, path))}; it was written for another model"
                )
            node = node[key]
        if isinstance(node, dict):
            node = node["value"]
        if tuple(node.shape) != tuple(variable.shape):
            raise torch_ckpt.CheckpointFormatError(
                f"{where}: {'.'.join(map(str, path))} has shape {tuple(node.shape)}, expected "
                f"{tuple(variable.shape)}"
            )
        flat.append((path, variable.replace(jnp.asarray(node, jnp.float32))))
    return nnx.from_flat_state(flat)


def _restore_tree(directory: str, item: str, step: int | None = None):
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(directory, item_names=(item,))
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {directory}")
    restored = manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore()}))
    manager.close()
    return restored[item], step


def save_converted(model: torch_ckpt.ImportedCheckpoint, directory: str) -> None:
    """Writes a converted checkpoint: `model.json` and an orbax item `params`."""
    import orbax.checkpoint as ocp

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
    manager = ocp.CheckpointManager(
        os.path.abspath(directory), item_names=("params",), options=ocp.CheckpointManagerOptions(create=True)
    )
    manager.save(0, args=ocp.args.Composite(params=ocp.args.StandardSave(tree)), force=True)
    manager.wait_until_finished()
    manager.close()
    with open(os.path.join(directory, CONVERTED_MODEL_FILE), "w") as f:
        json.dump(description, f, indent=2)


def load_converted(directory: str) -> LoadedCheckpoint:
    with open(os.path.join(directory, CONVERTED_MODEL_FILE)) as f:
        description = json.load(f)
    vit_config = ViTConfig(**description["vit_config"])
    head = description["head_config"]
    head_config = None if head is None else HeadConfig(**head)
    tree, _ = _restore_tree(os.path.abspath(directory), "params")
    abstract = _abstract_params(vit_config, head_config)
    nets = {
        name: _params_from_tree(abstract, tree[name], f"{directory} ({name})")
        for name in description["networks"]
    }
    center = tree.get("center")
    return LoadedCheckpoint(
        torch_ckpt.ImportedCheckpoint(
            vit_config,
            head_config,
            nets.get("student"),
            nets.get("teacher"),
            center=None if center is None else np.asarray(center),
            epoch=description.get("epoch"),
        )
    )


def load_workdir(workdir: str) -> LoadedCheckpoint:
    """The latest checkpoint of a dino_jax training run, with the configs its config.json gives."""
    import ml_collections

    from dino_jax import config as config_lib

    with open(os.path.join(workdir, "config.json")) as f:
        config = ml_collections.ConfigDict(json.load(f))
    vit_config = config_lib.vit_config(config, drop_path=False)
    head_config = config_lib.head_config(config, vit_config.embed_dim)
    state, step = _restore_tree(os.path.abspath(os.path.join(workdir, "checkpoints")), "state")
    abstract = _abstract_params(vit_config, head_config)
    where = f"{workdir} step {step}"
    model = torch_ckpt.ImportedCheckpoint(
        vit_config,
        head_config,
        student=_params_from_tree(abstract, state["student"], where + " (student)"),
        teacher=_params_from_tree(abstract, state["teacher"], where + " (teacher)"),
        center=np.asarray(state["center"], np.float32),
    )
    return LoadedCheckpoint(model, mean=tuple(config.dataset.mean), std=tuple(config.dataset.std), step=step)


def load_checkpoint(path: str, *, image_size: int | None = None) -> LoadedCheckpoint:
    """Any supported checkpoint (see the module docstring). `image_size` resizes the position
    embedding of a PyTorch checkpoint the way the reference does."""
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, CONVERTED_MODEL_FILE)):
            return load_converted(path)
        if os.path.exists(os.path.join(path, "config.json")):
            return load_workdir(path)
        raise FileNotFoundError(
            f"{path} is a directory with neither {CONVERTED_MODEL_FILE} (a converted checkpoint) nor "
            f"config.json (a training workdir)"
        )
    if path.endswith(TORCH_SUFFIXES):
        return LoadedCheckpoint(torch_ckpt.import_checkpoint(path, image_size=image_size))
    raise ValueError(
        f"unknown checkpoint {path!r}: expected a .pth/.safetensors file, a converted "
        f"checkpoint directory or a training workdir"
    )


def convert(
    src_path: str, dst_path: str, *, backbone_only: bool = False, image_size: int | None = None
) -> str:
    """Converts between PyTorch files and our checkpoints; the direction comes from the paths.

    - PyTorch file -> a directory: a converted checkpoint (`model.json` + orbax params);
    - PyTorch file -> `.pth`/`.safetensors`: re-written in the reference layout (e.g. a `.pth` to a
      `.safetensors` that loads without unpickling);
    - converted checkpoint or training workdir -> `.pth`/`.safetensors`: the reference's
      training-checkpoint layout, or with `backbone_only` the teacher's backbone state dict (the
      released form, loadable with strict=True).
    Returns a one-line summary.
    """
    loaded = load_checkpoint(src_path, image_size=image_size)
    model = loaded.model
    if not dst_path.endswith(TORCH_SUFFIXES):
        if src_path.endswith(TORCH_SUFFIXES):
            save_converted(model, dst_path)
            return f"converted {src_path} -> {dst_path} ({_describe(model)})"
        raise ValueError(
            f"{src_path} is already ours; convert it to a .pth or .safetensors file, not to {dst_path!r}"
        )
    if backbone_only or model.head_config is None:
        which = "teacher" if model.teacher is not None else "student"
        tree = torch_ckpt.backbone_to_torch(model.backbone(which), model.vit_config)
    else:
        # A file with one network (a bare DINO state dict) fills both: the reference's resume and
        # its evaluation scripts read 'student' and 'teacher' respectively.
        student = model.student if model.student is not None else model.teacher
        teacher = model.teacher if model.teacher is not None else model.student
        center = (
            model.center if model.center is not None else np.zeros((1, model.head_config.out_dim), np.float32)
        )
        tree = torch_ckpt.training_checkpoint(
            student, teacher, center, model.vit_config, model.head_config, epoch=model.epoch or 0
        )
    torch_ckpt.save_checkpoint_file(tree, dst_path)
    return f"converted {src_path} -> {dst_path} ({_describe(model)})"


def _describe(model: torch_ckpt.ImportedCheckpoint) -> str:
    c = model.vit_config
    text = (
        f"ViT {c.embed_dim}d x {c.depth} blocks, {c.num_heads} heads, patch {c.patch_size}, {c.image_size} px"
    )
    if model.head_config is not None:
        text += f"; head -> {model.head_config.out_dim}"
    return text


def embed(
    checkpoint: str,
    image_paths: str | Sequence[str],
    out_npz: str,
    *,
    batch_size: int = 64,
    network: str = "teacher",
) -> dict[str, np.ndarray]:
    """Final-norm CLS features of `network`'s backbone for each image file, written to `out_npz`
    as `features` (N, D) float32 and `paths` (N,) str; also returned.

    Pixels are normalised with the statistics the checkpoint was trained with (ImageNet's for
    PyTorch checkpoints, as in the reference; the run's config for a dino_jax workdir).
    """
    loaded = load_checkpoint(checkpoint)
    model = loaded.model
    config = dataclasses.replace(model.vit_config, drop_path_rate=0.0)
    params = model.backbone(network)
    graphdef = nnx.split(nnx.eval_shape(lambda: VisionTransformer(config, rngs=nnx.Rngs(0))))[0]

    @jax.jit
    def features_of(params, images_uint8):
        images = normalize_images(images_uint8, loaded.mean, loaded.std)
        return nnx.merge(graphdef, params)(images)

    files = image_files(image_paths)
    chunks = []
    for start in range(0, len(files), batch_size):
        batch = np.stack([load_image(path, config.image_size) for path in files[start : start + batch_size]])
        count = len(batch)
        if count < batch_size and start:  # pad the last batch: one compiled shape for all batches
            batch = np.concatenate([batch, np.zeros((batch_size - count,) + batch.shape[1:], batch.dtype)])
        chunks.append(np.asarray(features_of(params, batch))[:count])
    result = {"features": np.concatenate(chunks).astype(np.float32), "paths": np.asarray(files)}
    os.makedirs(os.path.dirname(os.path.abspath(out_npz)), exist_ok=True)
    np.savez(out_npz, **result)
    return result
