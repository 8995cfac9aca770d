"""Our parameters <-> the reference's layouts: state dicts of a backbone or a whole DINO model
(student/teacher), and a whole training checkpoint (`checkpoint.pth`) for the reference.

Plain dicts of numpy arrays named the PyTorch way on one side, `nnx.State` on the other; the key
tables of `torch_keys` say which tensor is which and how its layout changes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from dino_jax.interop.torch_io import CheckpointFormatError
from dino_jax.interop.torch_keys import (
    BN_BUFFERS,
    KeyEntry,
    dino_key_table,
    from_torch_layout,
    head_bn_buffer_keys,
    infer_head_config,
    infer_vit_config,
    split_backbone_and_head,
    strip_prefixes,
    to_torch_layout,
    torch_shape,
    uses_parametrizations,
    vit_key_table,
)
from dino_jax.models import stacking
from dino_jax.models.dino import DINO
from dino_jax.models.head import HeadConfig
from dino_jax.models.pos_embed import interpolate_pos_embed
from dino_jax.models.vit import ViTConfig, VisionTransformer


def abstract_model(
    vit_config: ViTConfig, head_config: HeadConfig | None = None
) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, parameter shapes) of a `VisionTransformer` (no head config) or a `DINO`, built
    without allocating or initialising anything."""
    if head_config is None:
        build = lambda: VisionTransformer(vit_config, rngs=nnx.Rngs(0))  # noqa: E731
    else:
        build = lambda: DINO(vit_config, head_config, rngs=nnx.Rngs(0))  # noqa: E731
    return nnx.split(nnx.eval_shape(build))


def _check_and_collect(
    state_dict: Mapping[str, Any],
    table: list[KeyEntry],
    abstract: nnx.State,
    *,
    allowed_extra: set[str],
    overrides: Mapping[str, np.ndarray],
    what: str,
) -> dict[tuple, np.ndarray]:
    """Our-path -> array for every table entry; one CheckpointFormatError listing every missing,
    unexpected and mis-shaped key otherwise."""
    shapes = stacking.per_block_shapes({path: var.shape for path, var in nnx.to_flat_state(abstract)})
    expected = {entry.torch for entry in table}
    missing = sorted(expected - set(state_dict))
    unexpected = sorted(set(state_dict) - expected - allowed_extra)
    misshaped, values = [], {}
    for entry in table:
        if entry.torch not in state_dict:
            continue
        array = overrides.get(entry.torch)
        if array is None:
            array = np.asarray(state_dict[entry.torch])
        want = torch_shape(shapes[entry.ours], entry.layout)
        if tuple(array.shape) != want:
            misshaped.append(f"{entry.torch}: got {tuple(array.shape)}, expected {want}")
            continue
        values[entry.ours] = from_torch_layout(array, entry.layout).astype(np.float32)
    if len(values) != len(table) or unexpected or misshaped:
        lines = [f"the {what} does not match the model its shapes describe:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): " + ", ".join(missing))
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): " + ", ".join(unexpected))
        if misshaped:
            lines.append(f"  mis-shaped keys ({len(misshaped)}): " + "; ".join(misshaped))
        raise CheckpointFormatError("\n".join(lines))
    return values


def _fill(abstract: nnx.State, values: Mapping[tuple, np.ndarray]) -> nnx.State:
    """`abstract` with the per-block `values` (stacked where the model stacks them)."""
    values = stacking.stacked(values, xp=np)
    return nnx.from_flat_state(
        [(path, var.replace(jax.numpy.asarray(values[path]))) for path, var in nnx.to_flat_state(abstract)]
    )


def _resized_pos_embed(
    backbone: Mapping[str, Any], config: ViTConfig, image_size: int | None
) -> tuple[ViTConfig, dict]:
    """Config and pos_embed override for `image_size` (the reference's bicubic, +0.1 offset)."""
    if image_size is None or image_size == config.image_size:
        return config, {}
    if image_size % config.patch_size:
        raise CheckpointFormatError(
            f"image_size {image_size} is not a multiple of the checkpoint's patch size {config.patch_size}"
        )
    grid = image_size // config.patch_size
    resized = np.asarray(
        interpolate_pos_embed(jax.numpy.asarray(np.asarray(backbone["pos_embed"], np.float32)), grid, grid)
    )
    return dataclasses.replace(config, image_size=image_size), {"pos_embed": resized}


def backbone_from_torch(
    state_dict: Mapping[str, Any],
    *,
    image_size: int | None = None,
    num_heads: int | None = None,
    dtype: str = "float32",
    drop_path_rate: float = 0.0,
) -> tuple[ViTConfig, nnx.State]:
    """(config, params of `VisionTransformer`) from a reference or timm ViT state dict.

    Accepts bare keys and `module.`/`backbone.` prefixes. `image_size` other than the stored
    grid's resizes the position embedding the way the reference does at run time.
    """
    backbone = strip_prefixes(state_dict)
    config = infer_vit_config(backbone, num_heads=num_heads, dtype=dtype)
    config = dataclasses.replace(config, drop_path_rate=drop_path_rate)
    config, overrides = _resized_pos_embed(backbone, config, image_size)
    _, abstract = abstract_model(config)
    values = _check_and_collect(
        backbone,
        vit_key_table(config),
        abstract,
        allowed_extra=set(),
        overrides={f"{k}": v for k, v in overrides.items()},
        what="backbone state dict",
    )
    return config, _fill(abstract, values)


def dino_from_torch(
    state_dict: Mapping[str, Any],
    *,
    image_size: int | None = None,
    num_heads: int | None = None,
    norm_last_layer: bool = True,
    dtype: str = "float32",
    drop_path_rate: float = 0.0,
) -> tuple[ViTConfig, HeadConfig, nnx.State]:
    """(ViT config, head config, params of `DINO`) from the reference's student or teacher dict
    (a MultiCropWrapper: `backbone.*` and `head.*`, optionally under `module.`)."""
    backbone, head = split_backbone_and_head(state_dict)
    vit_config = infer_vit_config(backbone, num_heads=num_heads, dtype=dtype)
    vit_config = dataclasses.replace(vit_config, drop_path_rate=drop_path_rate)
    vit_config, overrides = _resized_pos_embed(backbone, vit_config, image_size)
    head_config = infer_head_config(head, norm_last_layer=norm_last_layer, dtype=dtype)
    if head_config.in_dim != vit_config.embed_dim:
        raise CheckpointFormatError(
            f"head input width {head_config.in_dim} differs from the backbone's {vit_config.embed_dim}"
        )
    parametrized = uses_parametrizations(head)
    table = dino_key_table(vit_config, head_config, parametrized=parametrized)
    full = {"backbone." + k: v for k, v in backbone.items()}
    full.update({"head." + k: v for k, v in head.items()})
    _, abstract = abstract_model(vit_config, head_config)
    values = _check_and_collect(
        full,
        table,
        abstract,
        allowed_extra={"head." + key for key in head_bn_buffer_keys(head_config)},
        overrides={"backbone." + k: v for k, v in overrides.items()},
        what="DINO state dict",
    )
    return vit_config, head_config, _fill(abstract, values)


def _flat_numpy(params: nnx.State) -> dict[tuple, np.ndarray]:
    """`{path: array}` of `params`, stacked blocks split into one entry per block (the key
    tables' paths)."""
    return stacking.per_block(
        {path: np.asarray(jax.device_get(var.get_value())) for path, var in nnx.to_flat_state(params)}
    )


def _export(params: nnx.State, table: list[KeyEntry]) -> dict[str, np.ndarray]:
    flat = _flat_numpy(params)
    known = {entry.ours for entry in table}
    if set(flat) != known:
        extra = sorted(".".join(map(str, p)) for p in set(flat) - known)
        absent = sorted(".".join(map(str, p)) for p in known - set(flat))
        raise CheckpointFormatError(
            f"parameters do not match the config: not in the config {extra}; missing {absent}"
        )
    return {entry.torch: to_torch_layout(flat[entry.ours], entry.layout) for entry in table}


def backbone_to_torch(params: nnx.State, config: ViTConfig) -> dict[str, np.ndarray]:
    """The reference's backbone-only state dict (as released; timm names), loadable with
    strict=True into `vit_<variant>(patch_size, num_classes=0)`. `params` is a ViT's or a DINO's
    (its `backbone` part is taken)."""
    if "backbone" in params:
        params = params["backbone"]
    return _export(params, vit_key_table(config))


def dino_to_torch(
    params: nnx.State, vit_config: ViTConfig, head_config: HeadConfig, *, parametrized: bool = False
) -> dict[str, np.ndarray]:
    """A MultiCropWrapper state dict (`backbone.*`, `head.*`), BN buffers at PyTorch's initial
    values."""
    out = _export(params, dino_key_table(vit_config, head_config, parametrized=parametrized))
    for key in head_bn_buffer_keys(head_config):
        initial = BN_BUFFERS[key.rsplit(".", 1)[1]]
        size = head_config.hidden_dim
        out["head." + key] = (
            np.asarray(initial, np.int64)
            if isinstance(initial, int)
            else np.full((size,), initial, np.float32)
        )
    return out


def reference_args(vit_config: ViTConfig, head_config: HeadConfig) -> dict[str, Any]:
    """The model-describing options of the reference's `args`, for an exported checkpoint, as a
    dict of plain str/int/float/bool: the reference pickles an `argparse.Namespace` there, which
    `torch.load` refuses by default since PyTorch 2.6 (`weights_only=True`); its resume never
    reads `args`, and our importer reads either form."""
    return {
        "arch": f"vit_{_variant_name(vit_config)}",
        "patch_size": int(vit_config.patch_size),
        "out_dim": int(head_config.out_dim),
        "norm_last_layer": bool(head_config.norm_last_layer),
        "use_bn_in_head": bool(head_config.use_bn),
        "drop_path_rate": float(vit_config.drop_path_rate),
    }


def _variant_name(config: ViTConfig) -> str:
    from dino_jax.models.vit import VIT_VARIANTS

    for name, spec in VIT_VARIANTS.items():
        if (config.embed_dim, config.depth, config.num_heads) == (
            spec["embed_dim"],
            spec["depth"],
            spec["num_heads"],
        ):
            return name
    return f"custom_{config.embed_dim}x{config.depth}x{config.num_heads}"


def training_checkpoint(
    student: nnx.State,
    teacher: nnx.State,
    center: np.ndarray,
    vit_config: ViTConfig,
    head_config: HeadConfig,
    *,
    epoch: int = 0,
) -> dict[str, Any]:
    """The reference's `checkpoint.pth` layout: `student` under `module.` (DDP), `teacher` bare
    (under `module.` too when the head has BatchNorm, as the reference then wraps it in DDP),
    `dino_loss.center`, `epoch`; `args` holds the options that describe the model, as plain
    types, so the file loads with `torch.load(weights_only=True)`. No optimizer state: the
    reference's resume tolerates its absence and starts the optimizer fresh."""
    student_sd = {"module." + k: v for k, v in dino_to_torch(student, vit_config, head_config).items()}
    teacher_prefix = "module." if head_config.use_bn else ""
    teacher_sd = {teacher_prefix + k: v for k, v in dino_to_torch(teacher, vit_config, head_config).items()}
    return {
        "student": student_sd,
        "teacher": teacher_sd,
        "dino_loss": {"center": np.asarray(jax.device_get(center), np.float32)},
        "epoch": int(epoch),
        "args": reference_args(vit_config, head_config),
    }
