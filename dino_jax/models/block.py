"""The transformer block, run on the tokens of several crop groups at once.

A DINO student sees crops of two sizes (CIFAR: 2 x 65 tokens and 8 x 17 tokens per image). Only
attention needs each image's tokens together; everything else in a block (LayerNorm, the linear
layers, GELU, stochastic depth, the residual adds) works token by token. So on a GPU or TPU the
tokens of all groups travel through the blocks as one (rows, D) matrix, and attention takes each
group's rows back out as (B, N, D). Per block that is one kernel per token-wise operation instead
of one per group: the CIFAR step's student block went from 101 to 61 kernels and from 4.22 to
3.84 GB moved, compiled for an H100 (docs/benchmarks.md). The CPU runs the groups one after
another (`vit.forward_groups` says why). The arithmetic of every token is the same either way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dino_jax.models import fused_mlp, fused_norm, fused_proj, fused_qkv
from dino_jax.models.attention import Attention
from dino_jax.models.fused_grads import gelu
from dino_jax.models.layers import layer_norm, linear


@dataclasses.dataclass(frozen=True)
class GroupLayout:
    """One crop group's place in the token rows: `batch` images of `tokens` rows each, of which the
    first `valid` are real (the rest pad the count to even for cuDNN's fused attention)."""

    batch: int
    tokens: int
    valid: int

    @property
    def rows(self) -> int:
        return self.batch * self.tokens


@dataclasses.dataclass(frozen=True)
class TokenLayout:
    """Where each crop group's token rows sit in the (rows, D) matrix the blocks run on.

    With the batch split over `shards` devices, each device's rows stay its own: the matrix is
    `shards` equal pieces, piece s holding every group's rows of device s, group after group. A
    plain concatenation of the groups would put device s's local-crop rows far from its global-crop
    rows, and XLA would gather the whole batch onto every device to build it.
    """

    groups: tuple[GroupLayout, ...]
    shards: int = 1

    def __post_init__(self):
        for group in self.groups:
            if group.batch % self.shards:
                raise ValueError(f"{group.batch} images of a group do not split over {self.shards} devices")

    @property
    def images(self) -> int:
        return sum(group.batch for group in self.groups)

    def split(self, x_Rx_: jax.Array) -> list[jax.Array]:
        """The rows of each group, (B, N, ...), in the group's own order."""
        per_shard = x_Rx_.reshape(self.shards, -1, *x_Rx_.shape[1:])
        out, start = [], 0
        for group in self.groups:
            rows = group.rows // self.shards
            piece = per_shard[:, start : start + rows]
            out.append(piece.reshape(group.batch, group.tokens, *x_Rx_.shape[1:]))
            start += rows
        return out

    def join(self, pieces: Sequence[jax.Array]) -> jax.Array:
        """The inverse of `split`: each group's rows, (rows_g, ...), -> (rows, ...)."""
        if len(pieces) == 1:
            return pieces[0]
        tail = pieces[0].shape[1:]
        per_shard = [piece.reshape(self.shards, -1, *tail) for piece in pieces]
        return jnp.concatenate(per_shard, axis=1).reshape(-1, *tail)


def draw_drop_path_masks(rng: jax.Array, rates: Sequence[float], num_images: int) -> jax.Array:
    """Stochastic depth for a whole network in one draw: (depth, 2, num_images) booleans, True
    where image i keeps block b's attention (0) or MLP (1) branch, with probability 1 - rates[b].

    One draw, not one per block and branch: deriving a key per block, branch and crop group was a
    chain of tiny kernels on a GPU (76 of the CIFAR step's 210 kernels of at most 1,024 threads,
    compiled for an H100: docs/benchmarks.md). Each image's draws are independent, as the
    reference's per-sample `DropPath` makes them.
    """
    keep_Dx1x1 = 1.0 - jnp.asarray(rates, jnp.float32)[:, None, None]
    return jax.random.uniform(rng, (len(rates), 2, num_images)) < keep_Dx1x1


def drop_path_rows(x_RxD: jax.Array, layout: TokenLayout, rate, keep_images: jax.Array | None) -> jax.Array:
    """Per-image stochastic depth on token rows: the rows of image i (images numbered group after
    group, each group in its own order) are kept where `keep_images[i]` and rescaled by
    1 / (1 - rate), the reference's `x / keep * mask`; all zero where dropped."""
    if _no_drop_path(rate, keep_images):
        return x_RxD
    keep = 1.0 - rate
    return x_RxD / jnp.asarray(keep, x_RxD.dtype) * _row_keep(layout, keep_images, x_RxD.dtype)


def _no_drop_path(rate, keep_images) -> bool:
    return keep_images is None or (isinstance(rate, (int, float)) and rate == 0.0)


def _row_keep(layout: TokenLayout, keep_images: jax.Array, dtype) -> jax.Array:
    """(rows, 1): each image's 0/1 keep factor on each of its token rows, in `dtype` (XLA's GPU
    emitter failed on a fusion that broadcast the boolean mask itself)."""
    factors = keep_images.astype(dtype)
    masks, first = [], 0
    for group in layout.groups:
        per_image = factors[first : first + group.batch, None]
        masks.append(jnp.broadcast_to(per_image, (group.batch, group.tokens)).reshape(group.rows, 1))
        first += group.batch
    return layout.join(masks)


def _row_factors(layout: TokenLayout, rate, keep_images) -> jax.Array | None:
    """(rows,) float32: each row's stochastic-depth factor `keep / (1 - rate)` (None: none)."""
    if _no_drop_path(rate, keep_images):
        return None
    return _row_keep(layout, keep_images, jnp.float32)[:, 0] / (1.0 - rate)


class Mlp(nnx.Module):
    def __init__(self, embed_dim: int, hidden_dim: int, *, dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.fc1 = linear(embed_dim, hidden_dim, dtype=dtype, rngs=rngs)
        self.fc2 = linear(hidden_dim, embed_dim, dtype=dtype, rngs=rngs)

    def __call__(self, x_RxD: jax.Array) -> jax.Array:
        return self.fc2(gelu(self.fc1(x_RxD)))


class Block(nnx.Module):
    """Pre-norm transformer block with per-sample stochastic depth on both residual branches.

    The drop-path rate is an argument, not an attribute: the ViT keeps its blocks as one stack
    (`stacking.py`) that shares one structure, while the rate grows with depth."""

    def __init__(self, config, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(config.dtype)
        eps = config.layer_norm_eps
        self.norm1 = layer_norm(config.embed_dim, eps=eps, dtype=dtype, rngs=rngs)
        self.attn = Attention(
            config.embed_dim, config.num_heads, qkv_bias=config.qkv_bias, dtype=dtype, rngs=rngs
        )
        self.norm2 = layer_norm(config.embed_dim, eps=eps, dtype=dtype, rngs=rngs)
        self.mlp = Mlp(config.embed_dim, config.mlp_hidden_dim, dtype=dtype, rngs=rngs)

    def __call__(
        self,
        x_RxD: jax.Array,
        layout: TokenLayout,
        *,
        fused_attention: bool = False,
        pallas: bool = False,
        drop_path_rate: float | jax.Array = 0.0,
        keep_branches: jax.Array | None = None,
        interpret: bool = False,
    ) -> jax.Array:
        """Token rows (R, D) laid out as `layout` -> the block's output rows. `keep_branches`
        (2, images): which images keep the attention and the MLP branch (this block's entry of
        `draw_drop_path_masks`; None: no stochastic depth). `fused_attention`: cuDNN's attention;
        `pallas`: the Pallas kernels of `fused_mlp.py` and `fused_norm.py`; both forms of a CUDA
        program (`interpret`: the kernels in Pallas' interpreter, any backend)."""
        keep_attn = keep_mlp = None
        if keep_branches is not None:
            keep_attn, keep_mlp = keep_branches[0], keep_branches[1]
        if pallas and self._attention_kernels_take(x_RxD.shape[1], layout):
            x_RxD, groups_qkv = self._attention_input_kernels(x_RxD, layout, interpret)
            outputs = self.attn.group_outputs(groups_qkv, layout, fused=fused_attention)
            x_RxD = self._attention_output_kernels(
                x_RxD, outputs, layout, drop_path_rate, keep_attn, interpret
            )
        else:
            x_RxD, normed = self._pre_norm(self.norm1, x_RxD, pallas, interpret)
            attended = self.attn(normed, layout, fused=fused_attention)
            x_RxD = x_RxD + drop_path_rows(attended, layout, drop_path_rate, keep_attn)
        if pallas:
            return self._mlp_branch_kernels(x_RxD, layout, drop_path_rate, keep_mlp, interpret)
        return x_RxD + drop_path_rows(self.mlp(self.norm2(x_RxD)), layout, drop_path_rate, keep_mlp)

    @staticmethod
    def _attention_kernels_take(dim: int, layout: TokenLayout) -> bool:
        """Whether `fused_qkv` and `fused_proj` take these rows: widths they were compiled for,
        one device's rows, each group filling whole row blocks."""
        rows = tuple(group.rows for group in layout.groups)
        return (
            fused_qkv.supported(dim)
            and fused_proj.supported(dim)
            and layout.shards == 1
            and fused_qkv.layout_supported(rows)
        )

    @staticmethod
    def _pre_norm(norm, x_RxD, pallas: bool, interpret: bool):
        """`(residual path, norm(x))`; with `pallas`, one kernel differentiates the two together."""
        if not pallas:
            return x_RxD, norm(x_RxD)
        x_RxD = x_RxD.astype(norm.dtype or x_RxD.dtype)
        return fused_norm.residual_and_norm(x_RxD, norm.scale[...], norm.bias[...], norm.epsilon, interpret)

    def _attention_input_kernels(self, x_RxD, layout, interpret: bool):
        """`(x, each group's (q, k, v) as (B, N, H, K))` by the kernels of `fused_qkv.py`."""
        attn, dtype = self.attn, self.attn.dtype
        bias = attn.qkv.bias[...] if attn.qkv.bias is not None else jnp.zeros(attn.qkv.kernel.shape[1])
        x_RxD, groups = fused_qkv.norm_qkv(
            x_RxD.astype(dtype),
            self.norm1.scale[...],
            self.norm1.bias[...],
            attn.qkv.kernel[...].astype(dtype),
            bias.astype(dtype),
            tuple(group.rows for group in layout.groups),
            self.norm1.epsilon,
            interpret,
        )
        heads = attn.num_heads
        return x_RxD, [
            tuple(t.reshape(group.batch, group.tokens, heads, -1) for t in qkv)
            for group, qkv in zip(layout.groups, groups)
        ]

    def _attention_output_kernels(self, x_RxD, outputs, layout, rate, keep_images, interpret: bool):
        """`x + drop_path(proj(join(outputs)))` by the kernels of `fused_proj.py`."""
        proj, dtype = self.attn.proj, self.attn.dtype
        return fused_proj.projected_residual(
            x_RxD,
            [o.astype(dtype) for o in outputs],
            proj.kernel[...].astype(dtype),
            proj.bias[...].astype(dtype),
            _row_factors(layout, rate, keep_images),
            tuple(group.rows for group in layout.groups),
            interpret,
        )

    def _mlp_branch_kernels(self, x_RxD, layout, rate, keep_images, interpret: bool):
        """`x + drop_path(mlp(norm2(x)))` by the kernels of `fused_mlp.py`."""
        factor_R = _row_factors(layout, rate, keep_images)
        dtype = self.mlp.dtype
        mlp = (self.mlp.fc1.kernel, self.mlp.fc1.bias, self.mlp.fc2.kernel, self.mlp.fc2.bias)
        return fused_mlp.mlp_branch(
            x_RxD.astype(dtype),
            self.norm2.scale[...],
            self.norm2.bias[...],
            *(p[...].astype(dtype) for p in mlp),
            factor_R,
            self.norm2.epsilon,
            interpret,
        )
