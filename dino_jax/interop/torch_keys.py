"""Which PyTorch tensor is which of our parameters, and the architecture a state dict's shapes
describe: the reference's training checkpoints, its released backbones and timm-named ViT state
dicts (their layouts: docs/reference.md).

One table per model (`vit_key_table`, `head_key_table`) says which of our parameters is which
PyTorch tensor and how its layout changes; both directions of `torch_convert` read that table, so a
round trip is exact by construction.

Layouts: PyTorch Linear weights are (out, in), ours (in, out); the patch conv is OIHW there, HWIO
here; LayerNorm/BatchNorm `weight` is our `scale`; the weight-normalised last layer stores
`weight_g` (K, 1) and `weight_v` (K, bottleneck) there, (1, K) and (bottleneck, K) here.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from dino_jax.interop.torch_io import CheckpointFormatError
from dino_jax.models.head import HeadConfig
from dino_jax.models.vit import ViTConfig

# How a tensor's layout differs between the two sides.
SAME, LINEAR, CONV, TRANSPOSE = "same", "linear", "conv", "transpose"

# PyTorch BatchNorm buffers. DINO never reads them (both networks stay in train mode), so we keep
# no running statistics: they are accepted on import and written with PyTorch's initial values.
BN_BUFFERS = {"running_mean": 0.0, "running_var": 1.0, "num_batches_tracked": 0}

# The reference's head dimension is 64 for every released variant (tiny 192/3, small 384/6,
# base 768/12); the head count is not visible in any tensor shape.
DEFAULT_HEAD_DIM = 64

# ----------------------------------------------------------------------------------------------
# Key tables.


@dataclasses.dataclass(frozen=True)
class KeyEntry:
    ours: tuple  # path in our nnx state, e.g. ('blocks', 0, 'attn', 'qkv', 'kernel')
    torch: str  # PyTorch key, e.g. 'blocks.0.attn.qkv.weight'
    layout: str  # SAME | LINEAR | CONV | TRANSPOSE

    @property
    def name(self) -> str:
        """Our path as one dotted name, `optim.path_name`'s form: 'blocks.0.attn.qkv.kernel'."""
        return ".".join(map(str, self.ours))


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


def torch_shape(shape: tuple, layout: str) -> tuple:
    if layout in (LINEAR, TRANSPOSE):
        return tuple(reversed(shape))
    if layout == CONV:
        return (shape[3], shape[2], shape[0], shape[1])
    return tuple(shape)


def has_head(state_dict: Mapping[str, Any]) -> bool:
    """Whether a state dict holds a DINO head (`head.mlp*`/`head.last_layer*`, maybe under `module.`)."""
    return any(re.match(r"(module\.)?head\.(mlp|last_layer)", key) for key in state_dict)


def uses_parametrizations(head: Mapping[str, Any]) -> bool:
    """Whether a head state dict names its last layer as torch.nn.utils.parametrizations does."""
    return any(key.startswith("last_layer.parametrizations.") for key in head)


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
