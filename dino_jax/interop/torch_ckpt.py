"""PyTorch checkpoints in and out: the reference's training checkpoints, its released backbones and
timm-named ViT state dicts (REFERENCE.md §3).

Everything here works on plain dicts of numpy arrays named the PyTorch way; torch itself is
imported only to read or write `.pth` files, never for `.safetensors`. One table per model
(`vit_key_table`, `head_key_table`) says which of our parameters is which PyTorch tensor and how
its layout changes, and both directions read that table, so a round trip is exact by construction.

Layouts: PyTorch Linear weights are (out, in), ours (in, out); the patch conv is OIHW there, HWIO
here; LayerNorm/BatchNorm `weight` is our `scale`; the weight-normalised last layer stores
`weight_g` (K, 1) and `weight_v` (K, bottleneck) there, (1, K) and (bottleneck, K) here.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import pickle
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from dino_jax.models.dino import DINO
from dino_jax.models.head import HeadConfig
from dino_jax.models.vit import ViTConfig, VisionTransformer, interpolate_pos_embed

# How a tensor's layout differs between the two sides.
SAME, LINEAR, CONV, TRANSPOSE = "same", "linear", "conv", "transpose"

# PyTorch BatchNorm buffers. DINO never reads them (both networks stay in train mode), so we keep
# no running statistics: they are accepted on import and written with PyTorch's initial values.
BN_BUFFERS = {"running_mean": 0.0, "running_var": 1.0, "num_batches_tracked": 0}

# The reference's head dimension is 64 for every released variant (tiny 192/3, small 384/6,
# base 768/12); the head count is not visible in any tensor shape.
DEFAULT_HEAD_DIM = 64


class CheckpointFormatError(ValueError):
    """A checkpoint's keys or shapes are not those of a model we can build."""


class UnsafeCheckpointError(CheckpointFormatError):
    """A `.pth` file's pickle refers to code, which a weights-only load refuses to run."""


# ----------------------------------------------------------------------------------------------
# Files.


def _to_numpy(value: Any) -> Any:
    """Tensors -> numpy (float tensors of other precisions -> float32); containers recursively."""
    import torch

    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu()
        if tensor.is_floating_point() and tensor.dtype not in (torch.float32, torch.float64):
            tensor = tensor.float()
        return tensor.numpy()
    if isinstance(value, Mapping):
        return {key: _to_numpy(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_numpy(item) for item in value)
    if isinstance(value, argparse.Namespace):
        return {key: _to_numpy(item) for key, item in vars(value).items()}
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


def read_checkpoint_file(path: str) -> dict[str, Any]:
    """Reads a `.pth` (weights-only unpickling) or `.safetensors` file into nested dicts of numpy.

    A training checkpoint's `args` (an argparse.Namespace) becomes a dict. A `.safetensors` file
    whose keys start with `student.`, `teacher.` or `dino_loss.` is nested under those names.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        flat = load_file(path)
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
        what = f"'{found.group(1)}'" if found else "code or objects"
        raise UnsafeCheckpointError(
            f"refused to load {path}: its pickle refers to {what}, which a weights-only load does "
            f"not allow, and this loader never runs code from a checkpoint. If you trust the file, "
            f"re-save just its tensors (a state dict) or convert it to .safetensors"
        ) from error
    if not isinstance(raw, Mapping):
        raise CheckpointFormatError(
            f"{path} holds a {type(raw).__name__}; expected a dict (a state dict or a training "
            f"checkpoint with 'student'/'teacher')"
        )
    return _to_numpy(raw)


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
        raise ValueError(f"unknown checkpoint type {path!r}; expected a .pth or .safetensors file")
    import torch

    def to_torch(value):
        if isinstance(value, np.ndarray):
            return torch.tensor(np.asarray(value))
        if isinstance(value, Mapping):
            return {key: to_torch(item) for key, item in value.items()}
        return value

    torch.save(to_torch(tree), path)


# ----------------------------------------------------------------------------------------------
# Key tables.


@dataclasses.dataclass(frozen=True)
class KeyEntry:
    ours: tuple  # path in our nnx state, e.g. ('blocks', 0, 'attn', 'qkv', 'kernel')
    torch: str  # PyTorch key, e.g. 'blocks.0.attn.qkv.weight'
    layout: str  # SAME | LINEAR | CONV | TRANSPOSE


def vit_key_table(config: ViTConfig) -> list[KeyEntry]:
    table = [
        KeyEntry(("cls_token",), "cls_token", SAME),
        KeyEntry(("pos_embed",), "pos_embed", SAME),
        KeyEntry(("patch_embed", "kernel"), "patch_embed.proj.weight", CONV),
        KeyEntry(("patch_embed", "bias"), "patch_embed.proj.bias", SAME),
    ]

    def norm(ours, torch):
        return [
            KeyEntry(ours + ("scale",), torch + ".weight", SAME),
            KeyEntry(ours + ("bias",), torch + ".bias", SAME),
        ]

    def linear(ours, torch, bias=True):
        entries = [KeyEntry(ours + ("kernel",), torch + ".weight", LINEAR)]
        if bias:
            entries.append(KeyEntry(ours + ("bias",), torch + ".bias", SAME))
        return entries

    for i in range(config.depth):
        ours, torch = ("blocks", i), f"blocks.{i}"
        table += norm(ours + ("norm1",), torch + ".norm1")
        table += linear(ours + ("attn", "qkv"), torch + ".attn.qkv", bias=config.qkv_bias)
        table += linear(ours + ("attn", "proj"), torch + ".attn.proj")
        table += norm(ours + ("norm2",), torch + ".norm2")
        table += linear(ours + ("mlp", "fc1"), torch + ".mlp.fc1")
        table += linear(ours + ("mlp", "fc2"), torch + ".mlp.fc2")
    table += norm(("norm",), "norm")
    return table


def _head_mlp_index(config: HeadConfig, layer: int) -> str:
    """The reference's nn.Sequential index of Linear `layer` (BN and GELU take slots between)."""
    if config.nlayers == 1:
        return "mlp"  # a bare Linear, not a Sequential
    return f"mlp.{layer * (3 if config.use_bn else 2)}"


def head_key_table(config: HeadConfig, *, parametrized: bool = False) -> list[KeyEntry]:
    """Entries in the reference's parameter order (its optimizer state indexes by that order).

    `parametrized` names the last layer as torch.nn.utils.parametrizations.weight_norm does.
    """
    table = []
    for i in range(config.nlayers):
        torch = _head_mlp_index(config, i)
        table += [
            KeyEntry(("mlp", i, "kernel"), torch + ".weight", LINEAR),
            KeyEntry(("mlp", i, "bias"), torch + ".bias", SAME),
        ]
        if config.use_bn and i < config.nlayers - 1:
            torch = f"mlp.{3 * i + 1}"
            table += [
                KeyEntry(("bn", i, "scale"), torch + ".weight", SAME),
                KeyEntry(("bn", i, "bias"), torch + ".bias", SAME),
            ]
    if parametrized:
        g = "last_layer.parametrizations.weight.original0"
        v = "last_layer.parametrizations.weight.original1"
    else:
        g, v = "last_layer.weight_g", "last_layer.weight_v"
    table += [
        KeyEntry(("last_layer", "weight_g"), g, TRANSPOSE),
        KeyEntry(("last_layer", "weight_v"), v, TRANSPOSE),
    ]
    return table


def head_bn_buffer_keys(config: HeadConfig) -> list[str]:
    if not config.use_bn:
        return []
    return [f"mlp.{3 * i + 1}.{name}" for i in range(config.nlayers - 1) for name in BN_BUFFERS]


def dino_key_table(
    vit_config: ViTConfig, head_config: HeadConfig, *, parametrized: bool = False
) -> list[KeyEntry]:
    return [
        KeyEntry(("backbone",) + e.ours, "backbone." + e.torch, e.layout) for e in vit_key_table(vit_config)
    ] + [
        KeyEntry(("head",) + e.ours, "head." + e.torch, e.layout)
        for e in head_key_table(head_config, parametrized=parametrized)
    ]


def to_torch_layout(array: np.ndarray, layout: str) -> np.ndarray:
    if layout == LINEAR or layout == TRANSPOSE:
        return np.ascontiguousarray(array.T)
    if layout == CONV:  # HWIO -> OIHW
        return np.ascontiguousarray(array.transpose(3, 2, 0, 1))
    return np.asarray(array)


def from_torch_layout(array: np.ndarray, layout: str) -> np.ndarray:
    if layout == LINEAR or layout == TRANSPOSE:
        return np.ascontiguousarray(array.T)
    if layout == CONV:  # OIHW -> HWIO
        return np.ascontiguousarray(array.transpose(2, 3, 1, 0))
    return np.asarray(array)


def _torch_shape(shape: tuple, layout: str) -> tuple:
    if layout in (LINEAR, TRANSPOSE):
        return tuple(reversed(shape))
    if layout == CONV:
        return (shape[3], shape[2], shape[0], shape[1])
    return tuple(shape)


# ----------------------------------------------------------------------------------------------
# Inferring the architecture from tensor shapes.


def strip_prefixes(state_dict: Mapping[str, Any], prefixes=("module.", "backbone.")) -> dict:
    """Removes leading DDP/wrapper prefixes, in order, from every key that has them."""
    out = {}
    for key, value in state_dict.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def split_backbone_and_head(state_dict: Mapping[str, Any]) -> tuple[dict, dict]:
    """Keys of a DINO model (`module.` stripped): `backbone.*` and bare ViT keys go to the
    backbone, `head.*` to the head (without the `head.` prefix)."""
    backbone, head = {}, {}
    for key, value in strip_prefixes(state_dict, ("module.",)).items():
        if key.startswith("head."):
            head[key[len("head.") :]] = value
        else:
            backbone[key[len("backbone.") :] if key.startswith("backbone.") else key] = value
    return backbone, head


def _require(state_dict: Mapping[str, Any], key: str, what: str) -> np.ndarray:
    if key not in state_dict:
        sample = ", ".join(sorted(state_dict)[:8])
        raise CheckpointFormatError(
            f"cannot infer the {what}: key {key!r} is missing (keys start with: {sample})"
        )
    return np.asarray(state_dict[key])


def infer_vit_config(
    backbone: Mapping[str, Any], *, num_heads: int | None = None, dtype: str = "float32"
) -> ViTConfig:
    """The ViT that a reference/timm backbone state dict describes, at its stored resolution.

    Embedding width, patch size, depth, MLP ratio, qkv bias and position grid come from shapes; the
    head count does not show in any shape, so it is `embed_dim // 64` (true of every reference
    variant) unless `num_heads` is given.
    """
    conv = _require(backbone, "patch_embed.proj.weight", "patch size")
    if conv.ndim != 4 or conv.shape[2] != conv.shape[3] or conv.shape[1] != 3:
        raise CheckpointFormatError(f"patch_embed.proj.weight has shape {conv.shape}; expected (D, 3, p, p)")
    embed_dim, patch = int(conv.shape[0]), int(conv.shape[2])
    pos = _require(backbone, "pos_embed", "position grid")
    grid = math.isqrt(pos.shape[1] - 1)
    if pos.ndim != 3 or grid * grid != pos.shape[1] - 1:
        raise CheckpointFormatError(
            f"pos_embed has shape {pos.shape}; expected (1, 1 + g*g, D) for a square g x g grid"
        )
    depths = [int(m.group(1)) for key in backbone if (m := re.match(r"blocks\.(\d+)\.", key))]
    if not depths:
        raise CheckpointFormatError("no 'blocks.<i>.' keys: this is not a ViT state dict")
    fc1 = _require(backbone, "blocks.0.mlp.fc1.weight", "MLP width")
    if num_heads is None:
        if embed_dim % DEFAULT_HEAD_DIM:
            raise CheckpointFormatError(
                f"embed_dim {embed_dim} is not a multiple of {DEFAULT_HEAD_DIM}: pass num_heads, the "
                f"head count cannot be read from the tensor shapes"
            )
        num_heads = embed_dim // DEFAULT_HEAD_DIM
    return ViTConfig(
        image_size=grid * patch,
        patch_size=patch,
        embed_dim=embed_dim,
        depth=max(depths) + 1,
        num_heads=num_heads,
        mlp_ratio=fc1.shape[0] / embed_dim,
        qkv_bias="blocks.0.attn.qkv.bias" in backbone,
        dtype=dtype,
    )


def infer_head_config(
    head: Mapping[str, Any], *, norm_last_layer: bool = True, dtype: str = "float32"
) -> HeadConfig:
    """The DINOHead a head state dict (keys without `head.`) describes."""
    if "mlp.weight" in head:  # nlayers == 1: the mlp is a bare Linear
        linears = {0: np.asarray(head["mlp.weight"])}
        use_bn = False
    else:
        linears, norms = {}, set()
        for key, value in head.items():
            match = re.fullmatch(r"mlp\.(\d+)\.weight", key)
            if match is None:
                continue
            if np.ndim(value) == 2:
                linears[int(match.group(1))] = np.asarray(value)
            else:  # a BatchNorm1d weight
                norms.add(int(match.group(1)))
        use_bn = bool(norms)
        linears = dict(sorted(linears.items()))
    if not linears:
        raise CheckpointFormatError("no 'head.mlp.<i>.weight' keys: this is not a DINO head")
    weights = list(linears.values())
    if "last_layer.weight_v" in head:
        v = np.asarray(head["last_layer.weight_v"])
    else:
        v = _require(head, "last_layer.parametrizations.weight.original1", "head output size")
    return HeadConfig(
        in_dim=int(weights[0].shape[1]),
        out_dim=int(v.shape[0]),
        hidden_dim=int(weights[0].shape[0]) if len(weights) > 1 else 2048,
        bottleneck_dim=int(weights[-1].shape[0]),
        nlayers=len(weights),
        use_bn=use_bn,
        norm_last_layer=norm_last_layer,
        dtype=dtype,
    )


# ----------------------------------------------------------------------------------------------
# PyTorch state dict <-> our parameters.


def _abstract_params(build) -> nnx.State:
    return nnx.split(nnx.eval_shape(build))[1]


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
    shapes = {path: tuple(var.shape) for path, var in nnx.to_flat_state(abstract)}
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
        want = _torch_shape(shapes[entry.ours], entry.layout)
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
        raise ValueError(f"image_size {image_size} is not a multiple of patch size {config.patch_size}")
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
    abstract = _abstract_params(lambda: VisionTransformer(config, rngs=nnx.Rngs(0)))
    values = _check_and_collect(
        backbone,
        vit_key_table(config),
        abstract,
        allowed_extra=set(),
        overrides={f"{k}": v for k, v in overrides.items()},
        what="backbone state dict",
    )
    return config, _fill(abstract, values)


def _uses_parametrizations(head: Mapping[str, Any]) -> bool:
    return any(key.startswith("last_layer.parametrizations.") for key in head)


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
    parametrized = _uses_parametrizations(head)
    table = dino_key_table(vit_config, head_config, parametrized=parametrized)
    full = {"backbone." + k: v for k, v in backbone.items()}
    full.update({"head." + k: v for k, v in head.items()})
    abstract = _abstract_params(lambda: DINO(vit_config, head_config, rngs=nnx.Rngs(0)))
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
    return {path: np.asarray(jax.device_get(var.get_value())) for path, var in nnx.to_flat_state(params)}


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


# ----------------------------------------------------------------------------------------------
# Whole checkpoints.


@dataclasses.dataclass
class ImportedCheckpoint:
    """What a PyTorch file held, as our configs and parameters.

    `student`/`teacher` are `DINO` params when the file has a head, else `VisionTransformer` params
    (`head_config` None). A backbone-only file fills `teacher` (the reference releases the
    teacher's backbone) and leaves `student` None.
    """

    vit_config: ViTConfig
    head_config: HeadConfig | None
    student: nnx.State | None
    teacher: nnx.State | None
    center: np.ndarray | None = None
    epoch: int | None = None
    args: dict | None = None
    optimizer: dict | None = None  # the torch optimizer state dict, as read

    def backbone(self, which: str = "teacher") -> nnx.State:
        params = self.teacher if which == "teacher" else self.student
        if params is None:
            raise CheckpointFormatError(f"the checkpoint holds no {which} network")
        return params["backbone"] if self.head_config is not None else params


def _has_head(state_dict: Mapping[str, Any]) -> bool:
    return any(re.match(r"(module\.)?head\.(mlp|last_layer)", key) for key in state_dict)


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
) -> ImportedCheckpoint:
    """Reads a reference training checkpoint, a full (student or teacher) DINO state dict, or a
    backbone-only/timm ViT state dict, from a path or an already-read dict.

    `norm_last_layer` defaults to the checkpoint's own `args.norm_last_layer`, else True.
    """
    raw = read_checkpoint_file(source) if isinstance(source, str) else _to_numpy(source)
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
            if _has_head(state_dict):
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
        return ImportedCheckpoint(
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
    if _has_head(tensors):
        vit_config, head_config, params = dino_from_torch(tensors, norm_last_layer=norm, **options)
        return ImportedCheckpoint(vit_config, head_config, None, params)
    vit_config, params = backbone_from_torch(tensors, **options)
    return ImportedCheckpoint(vit_config, None, None, params)


def reference_args(vit_config: ViTConfig, head_config: HeadConfig) -> argparse.Namespace:
    """The model-describing options of the reference's `args`, for an exported checkpoint."""
    return argparse.Namespace(
        arch=f"vit_{_variant_name(vit_config)}",
        patch_size=vit_config.patch_size,
        out_dim=head_config.out_dim,
        norm_last_layer=head_config.norm_last_layer,
        use_bn_in_head=head_config.use_bn,
        drop_path_rate=vit_config.drop_path_rate,
    )


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
    include_args: bool = True,
) -> dict[str, Any]:
    """The reference's `checkpoint.pth` layout: `student` under `module.` (DDP), `teacher` bare
    (under `module.` too when the head has BatchNorm, as the reference then wraps it in DDP),
    `dino_loss.center`, `epoch`; `args` holds the options that describe the model. No optimizer
    state: the reference's resume tolerates its absence and starts the optimizer fresh."""
    student_sd = {"module." + k: v for k, v in dino_to_torch(student, vit_config, head_config).items()}
    teacher_prefix = "module." if head_config.use_bn else ""
    teacher_sd = {teacher_prefix + k: v for k, v in dino_to_torch(teacher, vit_config, head_config).items()}
    checkpoint = {
        "student": student_sd,
        "teacher": teacher_sd,
        "dino_loss": {"center": np.asarray(jax.device_get(center), np.float32)},
        "epoch": int(epoch),
    }
    if include_args:
        checkpoint["args"] = reference_args(vit_config, head_config)
    return checkpoint


# ----------------------------------------------------------------------------------------------
# Optimizer state.


def _path_tuple(path) -> tuple:
    keys = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            keys.append(key.key)
        elif isinstance(key, jax.tree_util.SequenceKey):
            keys.append(key.idx)
        elif isinstance(key, jax.tree_util.GetAttrKey):
            keys.append(key.name)
        else:
            keys.append(str(key))
    if keys and keys[-1] == "value":  # the array inside an nnx Variable
        keys.pop()
    return tuple(keys)


def adam_moments(opt_state) -> dict[tuple, tuple[np.ndarray, np.ndarray, int]]:
    """`{param path: (first moment, second moment, step count)}` in our layout, from every
    `scale_by_adam` state inside an optax state (chains, multi_transform groups, wrappers); leaves
    masked out of a group are skipped, so each parameter appears once."""
    import optax

    def is_adam(node):
        return isinstance(node, optax.ScaleByAdamState)

    def is_masked(node):
        return isinstance(node, optax.MaskedNode)

    moments = {}
    for node in jax.tree_util.tree_leaves(opt_state, is_leaf=is_adam):
        if not is_adam(node):
            continue
        count = int(jax.device_get(node.count))
        mu = jax.tree_util.tree_flatten_with_path(node.mu, is_leaf=is_masked)[0]
        nu = dict(jax.tree_util.tree_flatten_with_path(node.nu, is_leaf=is_masked)[0])
        for path, first in mu:
            if is_masked(first):
                continue
            key = _path_tuple(path)
            if key in moments:
                raise ValueError(f"parameter {key} has Adam moments in two groups")
            moments[key] = (np.asarray(jax.device_get(first)), np.asarray(jax.device_get(nu[path])), count)
    return moments


def torch_adam_moments(
    optimizer_state: Mapping[str, Any],
    vit_config: ViTConfig,
    head_config: HeadConfig,
    *,
    parametrized: bool = False,
) -> dict[tuple, tuple[np.ndarray, np.ndarray, int]]:
    """The reference's AdamW state (`checkpoint['optimizer']`) as `{our DINO param path:
    (exp_avg, exp_avg_sq, step)}` in our layouts.

    PyTorch indexes its state by position in `param_groups`; the reference builds those groups
    from the student's trainable parameters in module order, decayed ones (>= 2 dims, not a bias)
    first. A tensor the optimizer never stepped (the last layer during its freeze) has no entry.
    """
    table = dino_key_table(vit_config, head_config, parametrized=parametrized)
    abstract = _abstract_params(lambda: DINO(vit_config, head_config, rngs=nnx.Rngs(0)))
    shapes = {path: tuple(var.shape) for path, var in nnx.to_flat_state(abstract)}
    trainable = [
        entry for entry in table if not (head_config.norm_last_layer and entry.ours[-1] == "weight_g")
    ]

    def decayed(entry):
        return not entry.torch.endswith(".bias") and len(shapes[entry.ours]) > 1

    ordered = [e for e in trainable if decayed(e)] + [e for e in trainable if not decayed(e)]
    groups = optimizer_state.get("param_groups", [])
    indices = [index for group in groups for index in group["params"]]
    if len(indices) != len(ordered):
        raise CheckpointFormatError(
            f"the optimizer state has {len(indices)} parameters, the model {len(ordered)} trainable "
            f"ones (norm_last_layer={head_config.norm_last_layer}): it was saved for another model"
        )
    moments = {}
    for index, entry in zip(indices, ordered):
        state = optimizer_state.get("state", {}).get(index)
        if not state:
            continue
        first, second = np.asarray(state["exp_avg"]), np.asarray(state["exp_avg_sq"])
        want = _torch_shape(shapes[entry.ours], entry.layout)
        if first.shape != want or second.shape != want:
            raise CheckpointFormatError(
                f"optimizer moments of {entry.torch} have shape {first.shape}, expected {want}"
            )
        moments[entry.ours] = (
            from_torch_layout(first, entry.layout).astype(np.float32),
            from_torch_layout(second, entry.layout).astype(np.float32),
            int(np.asarray(state["step"])),
        )
    return moments


def fill_adam_moments(opt_state, moments: Mapping[tuple, tuple[np.ndarray, np.ndarray, int]]):
    """`opt_state` with the first/second moments of every `scale_by_adam` state replaced by
    `moments` (paths as `adam_moments` gives them), and each Adam state's step count set to that
    of its parameters. Other counters (schedules, freeze) are left to the caller, who knows the
    global step. Raises if a group mixes step counts or a moment has no parameter here."""
    import optax

    def is_adam(node):
        return isinstance(node, optax.ScaleByAdamState)

    def is_masked(node):
        return isinstance(node, optax.MaskedNode)

    used = set()

    def fill(node):
        if not is_adam(node):
            return node
        steps = set()

        def replace(which):
            def leaf(path, value):
                key = _path_tuple(path)
                if is_masked(value) or key not in moments:
                    return value
                used.add(key)
                steps.add(moments[key][2])
                return jax.numpy.asarray(moments[key][which], value.dtype)

            return leaf

        mu = jax.tree_util.tree_map_with_path(replace(0), node.mu, is_leaf=is_masked)
        nu = jax.tree_util.tree_map_with_path(replace(1), node.nu, is_leaf=is_masked)
        if len(steps) > 1:
            raise CheckpointFormatError(f"one Adam group holds parameters at steps {sorted(steps)}")
        count = jax.numpy.asarray(steps.pop(), node.count.dtype) if steps else node.count
        return node._replace(count=count, mu=mu, nu=nu)

    filled = jax.tree_util.tree_map(fill, opt_state, is_leaf=is_adam)
    unused = sorted(".".join(map(str, key)) for key in set(moments) - used)
    if unused:
        raise CheckpointFormatError(
            f"optimizer moments for parameters this optimizer does not update: {', '.join(unused)}"
        )
    return filled
