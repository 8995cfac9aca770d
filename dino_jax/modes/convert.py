"""`launch.py --mode=convert`: between PyTorch files and our checkpoints; the direction comes from
the paths."""

from __future__ import annotations

import os

import numpy as np

from dino_jax.interop.load import LoadedCheckpoint, load_checkpoint, save_converted
from dino_jax.interop.torch_convert import backbone_to_torch, training_checkpoint
from dino_jax.interop.torch_io import TORCH_SUFFIXES, CheckpointFormatError, save_checkpoint_file


def run(src_path: str, dst_path: str, *, backbone_only: bool = False, image_size: int | None = None) -> str:
    """Converts `src_path` (any checkpoint `load_checkpoint` reads) to `dst_path`:

    - PyTorch file -> a directory: a converted checkpoint (`model.json` + orbax params);
    - PyTorch file -> `.pth`/`.safetensors`: re-written in the reference layout (e.g. a `.pth` to a
      `.safetensors` that loads without unpickling);
    - converted checkpoint or training workdir -> `.pth`/`.safetensors`: the reference's
      training-checkpoint layout, or with `backbone_only` the teacher's backbone state dict (the
      released form, loadable with strict=True).
    A destination with another extension, or a directory for a source that is already ours, is
    refused before anything is read. Returns a one-line summary.
    """
    to_torch = dst_path.endswith(TORCH_SUFFIXES)
    extension = os.path.splitext(os.path.basename(dst_path.rstrip(os.sep)))[1]
    if not to_torch and extension and not os.path.isdir(dst_path):
        raise CheckpointFormatError(
            f"--to={dst_path}: cannot write a {extension} file; expected a .pth or .safetensors file, "
            f"or a directory (a name without an extension) for a converted checkpoint"
        )
    if not to_torch and not src_path.endswith(TORCH_SUFFIXES):
        raise CheckpointFormatError(
            f"{src_path} is already ours; convert it to a .pth or .safetensors file, not to {dst_path!r}"
        )
    model = load_checkpoint(src_path, image_size=image_size)
    if not to_torch:
        save_converted(model, dst_path)
        return f"converted {src_path} -> {dst_path} ({_describe(model)})"
    if backbone_only or model.head_config is None:
        _, params = model.backbone()
        tree = backbone_to_torch(params, model.vit_config)
    else:
        # A file with one network (a bare DINO state dict) fills both: the reference's resume and
        # its evaluation scripts read 'student' and 'teacher' respectively.
        student = model.student if model.student is not None else model.teacher
        teacher = model.teacher if model.teacher is not None else model.student
        center = (
            model.center if model.center is not None else np.zeros((1, model.head_config.out_dim), np.float32)
        )
        tree = training_checkpoint(
            student, teacher, center, model.vit_config, model.head_config, epoch=model.epoch or 0
        )
    save_checkpoint_file(tree, dst_path)
    return f"converted {src_path} -> {dst_path} ({_describe(model)})"


def _describe(model: LoadedCheckpoint) -> str:
    c = model.vit_config
    text = (
        f"ViT {c.embed_dim}d x {c.depth} blocks, {c.num_heads} heads, patch {c.patch_size}, {c.image_size} px"
    )
    if model.head_config is not None:
        text += f"; head -> {model.head_config.out_dim}"
    return text
