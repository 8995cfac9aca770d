"""Vision Transformer backbone of DINO, numerically faithful to the PyTorch reference.

Layouts are Flax-native: images NHWC, Linear kernels (in, out), the patch conv kernel HWIO.
The module holds only `nnx.Param` state; stochastic depth takes an explicit key at call time, so
`graphdef, params = nnx.split(model)` gives a pure pytree that student and teacher can share.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dino_jax.models.fused_grads import LayerNorm, gelu

# embed_dim, depth, num_heads of the reference's factory functions (vision_transformer.py).
VIT_VARIANTS: dict[str, dict[str, int]] = {
    "tiny": {"embed_dim": 192, "depth": 12, "num_heads": 3},
    "small": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "base": {"embed_dim": 768, "depth": 12, "num_heads": 12},
}

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Shape and numerics of a ViT; `dtype` is the compute dtype, parameters stay float32."""

    image_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path_rate: float = 0.0
    layer_norm_eps: float = 1e-6
    dtype: str = "float32"

    def __post_init__(self):
        if self.patch_size <= 0 or self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a positive multiple of patch_size {self.patch_size}"
            )
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.depth < 1:
            raise ValueError(f"depth {self.depth} must be at least 1")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate {self.drop_path_rate} must be in [0, 1)")
        if self.dtype not in COMPUTE_DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {COMPUTE_DTYPES}")

    @classmethod
    def from_variant(cls, variant: str, **overrides: Any) -> "ViTConfig":
        """The reference's vit_<variant>; image_size 224 and patch_size 16 unless overridden."""
        if variant not in VIT_VARIANTS:
            raise ValueError(f"unknown ViT variant {variant!r}; expected one of {sorted(VIT_VARIANTS)}")
        fields = {"image_size": 224, "patch_size": 16, **VIT_VARIANTS[variant]}
        fields.update(overrides)
        return cls(**fields)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)


# ----------------------------------------------------------------------------------------------
# Initialisers matching the reference.


def normal_init(stddev: float):
    # The reference's trunc_normal_ cuts at +-2 in absolute units, i.e. +-100 sigma for std 0.02:
    # a plain normal. jax's truncated_normal would cut at +-2 sigma and shrink the std by ~12%.
    def init(key, shape, dtype=jnp.float32):
        return stddev * jax.random.normal(key, shape, dtype)

    return init


def torch_default_uniform_init(fan_in: int):
    """PyTorch's default Linear/Conv init: kaiming_uniform(a=sqrt(5)) on the weight and its bias
    init both reduce to uniform(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _dtype(name: str):
    return jnp.dtype(name)


class TokenLinear(nnx.Linear):
    """`nnx.Linear` applied to the rows of a (..., in) array flattened to 2-D, (rows, in) @ (in, out).

    The same parameters and result as `nnx.Linear` on (B, N, in) tokens. Why: the weight gradient of
    a 3-D product contracts two axes, and XLA:CPU lays the output gradient out transposed for it (a
    transposing copy, the gradient recomputed once per consumer): one qkv projection's forward and
    backward on (128, 65, 192) took 85 ms against 48 ms on 2-D rows (docs/benchmarks.md). The
    reshape is free (a bitcast) on every backend.
    """

    def __call__(self, x: jax.Array) -> jax.Array:
        rows_RxI = x.reshape(-1, x.shape[-1])
        return super().__call__(rows_RxI).reshape(*x.shape[:-1], -1)


def linear(
    in_features: int, out_features: int, *, dtype, rngs: nnx.Rngs, use_bias: bool = True
) -> nnx.Linear:
    return TokenLinear(
        in_features,
        out_features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=normal_init(0.02),
        bias_init=nnx.initializers.zeros_init(),
        rngs=rngs,
    )


def layer_norm(dim: int, *, eps: float, dtype, rngs: nnx.Rngs) -> LayerNorm:
    # Statistics in float32 whatever `dtype` is; the backward is written out (fused_grads.py).
    return LayerNorm(dim, epsilon=eps, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


# ----------------------------------------------------------------------------------------------
# Position-embedding interpolation.


def _torch_cubic_weights(t: np.ndarray) -> np.ndarray:
    """The 4 tap weights of PyTorch's bicubic kernel (A = -0.75) for offsets t, shape (..., 4)."""
    a = np.float32(-0.75)
    one, two = np.float32(1.0), np.float32(2.0)

    def near(x):  # |x| <= 1
        return ((a + two) * x - (a + np.float32(3.0))) * x * x + one

    def far(x):  # 1 < |x| < 2
        return ((a * x - np.float32(5.0) * a) * x + np.float32(8.0) * a) * x - np.float32(4.0) * a

    return np.stack([far(t + one), near(t), near(one - t), far(two - t)], axis=-1)


def bicubic_matrix(in_size: int, out_size: int, scale: float) -> np.ndarray:
    """(out_size, in_size) float32 matrix of PyTorch's 1-D bicubic resampling, align_corners=False,
    with the *given* scale factor in the coordinate map (what F.interpolate does when called with
    scale_factor and no size): src = (dst + 0.5) / scale - 0.5, taps clamped at the border.

    Coordinates and weights are computed in float32 from float32(1 / scale), as PyTorch does for
    float32 inputs, so the weights agree bit for bit and only summation order differs.
    """
    half = np.float32(0.5)
    src = np.float32(1.0 / scale) * (np.arange(out_size, dtype=np.float32) + half) - half
    floor = np.floor(src)
    weights = _torch_cubic_weights((src - floor).astype(np.float32))
    matrix = np.zeros((out_size, in_size), np.float32)
    for tap in range(4):
        index = np.clip(floor.astype(np.int64) - 1 + tap, 0, in_size - 1)
        np.add.at(matrix, (np.arange(out_size), index), weights[:, tap])
    return matrix


def pos_embed_resize_matrices(grid: int, out_h: int, out_w: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column matrices that resize a (grid, grid) position grid to (out_h, out_w) like the
    reference's interpolate_pos_encoding: scale factors (out + 0.1) / grid (its issue #8 offset).

    The separable matrices are built here rather than with jax.image.resize: the reference feeds
    the +0.1 scale factor into the coordinate map (sample points shift, not only the output size),
    while jax.image.resize derives the scale from the sizes and, when shrinking, antialiases with
    a widened kernel that PyTorch's plain bicubic does not use. The matrices depend on shapes
    only, so they are constants under jit.
    """
    scale_h = (out_h + 0.1) / grid
    scale_w = (out_w + 0.1) / grid
    # PyTorch derives the output size as floor(in * scale); the reference asserts it is the grid.
    got_h, got_w = math.floor(grid * scale_h), math.floor(grid * scale_w)
    if (got_h, got_w) != (out_h, out_w):
        raise ValueError(
            f"position grid {grid} scaled by ({scale_h}, {scale_w}) gives "
            f"({got_h}, {got_w}), expected ({out_h}, {out_w})"
        )
    return bicubic_matrix(grid, out_h, scale_h), bicubic_matrix(grid, out_w, scale_w)


def interpolate_pos_embed(pos_embed_1xTxD: jax.Array, out_h: int, out_w: int) -> jax.Array:
    """Resize the patch part of a (1, 1 + g*g, D) position embedding to an (out_h, out_w) patch
    grid, keeping the CLS position. Always resamples, even to the same grid (the +0.1 offset moves
    the sample points): whether to call it is `prepare_tokens`' decision."""
    num_patches = pos_embed_1xTxD.shape[1] - 1
    grid = math.isqrt(num_patches)
    if grid * grid != num_patches:
        raise ValueError(f"position embedding has {num_patches} patch positions, not a square grid")
    rows_HxG, cols_WxG = pos_embed_resize_matrices(grid, out_h, out_w)
    dim = pos_embed_1xTxD.shape[-1]
    patch_GxGxD = pos_embed_1xTxD[0, 1:].reshape(grid, grid, dim)
    # HIGHEST: the default matmul precision on TPU/GPU would round the embedding to bfloat16.
    resized_HxWxD = jnp.einsum(
        "hg,gkd,wk->hwd", rows_HxG, patch_GxGxD, cols_WxG, precision=jax.lax.Precision.HIGHEST
    )
    return jnp.concatenate([pos_embed_1xTxD[:, :1], resized_HxWxD.reshape(1, out_h * out_w, dim)], axis=1)


# ----------------------------------------------------------------------------------------------
# Layers.


def drop_path(x_BxNxD: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """Per-sample stochastic depth: each row is kept with probability 1 - rate and rescaled."""
    if rng is None or rate == 0.0:
        return x_BxNxD
    keep = 1.0 - rate
    mask_Bx1x1 = jax.random.bernoulli(rng, keep, (x_BxNxD.shape[0],) + (1,) * (x_BxNxD.ndim - 1))
    # `x / keep * mask`, the reference's arithmetic (so bit for bit the same rows): a multiply by a
    # (B, 1, 1) 0/1 factor, which XLA fuses as a cheap broadcast where a select was slower on CPU.
    return x_BxNxD / jnp.asarray(keep, x_BxNxD.dtype) * mask_Bx1x1.astype(x_BxNxD.dtype)


class Attention(nnx.Module):
    """Multi-head self-attention; qkv kernel columns are [q | k | v], each split by head."""

    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
        dim = config.embed_dim
        self.num_heads = config.num_heads
        self.scale = (dim // config.num_heads) ** -0.5
        self.dtype = _dtype(config.dtype)
        self.qkv = linear(dim, 3 * dim, use_bias=config.qkv_bias, dtype=self.dtype, rngs=rngs)
        self.proj = linear(dim, dim, dtype=self.dtype, rngs=rngs)

    def __call__(self, x_BxNxD: jax.Array, *, record_attention: bool = False) -> jax.Array:
        batch, tokens, dim = x_BxNxD.shape
        head_dim = dim // self.num_heads
        # Heads-major (3, B, H, N, K) before the products, so both batched products and the softmax
        # run on contiguous (N, K) / (N, N) tiles per (image, head); with the heads left inside the
        # token axis, XLA:CPU chose transposed layouts for k, v and the output (a block's forward
        # on 128 x 65 tokens: 65 ms against 53 ms, docs/benchmarks.md).
        qkv_3xBxHxNxK = (
            self.qkv(x_BxNxD).reshape(batch, tokens, 3, self.num_heads, head_dim).transpose(2, 0, 3, 1, 4)
        )
        q_BxHxNxK, k_BxHxNxK, v_BxHxNxK = qkv_3xBxHxNxK[0], qkv_3xBxHxNxK[1], qkv_3xBxHxNxK[2]
        logits_BxHxNxN = jnp.einsum(
            "bhqk,bhtk->bhqt",
            q_BxHxNxK * jnp.asarray(self.scale, q_BxHxNxK.dtype),
            k_BxHxNxK,
            preferred_element_type=jnp.float32,
        )
        attn_BxHxNxN = jax.nn.softmax(logits_BxHxNxN, axis=-1)
        if record_attention:
            self.sow(nnx.Intermediate, "attention", attn_BxHxNxN)
        out_BxHxNxK = jnp.einsum("bhqt,bhtk->bhqk", attn_BxHxNxN.astype(self.dtype), v_BxHxNxK)
        return self.proj(out_BxHxNxK.transpose(0, 2, 1, 3).reshape(batch, tokens, dim))


class Mlp(nnx.Module):
    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
        dtype = _dtype(config.dtype)
        self.fc1 = linear(config.embed_dim, config.mlp_hidden_dim, dtype=dtype, rngs=rngs)
        self.fc2 = linear(config.mlp_hidden_dim, config.embed_dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(gelu(self.fc1(x)))


class Block(nnx.Module):
    """Pre-norm transformer block with per-sample stochastic depth on both residual branches."""

    def __init__(self, config: ViTConfig, drop_path_rate: float, *, rngs: nnx.Rngs):
        dtype = _dtype(config.dtype)
        eps = config.layer_norm_eps
        self.drop_path_rate = float(drop_path_rate)
        self.norm1 = layer_norm(config.embed_dim, eps=eps, dtype=dtype, rngs=rngs)
        self.attn = Attention(config, rngs=rngs)
        self.norm2 = layer_norm(config.embed_dim, eps=eps, dtype=dtype, rngs=rngs)
        self.mlp = Mlp(config, rngs=rngs)

    def __call__(self, x_BxNxD: jax.Array, *, drop_path_rng: jax.Array | None = None) -> jax.Array:
        attn_rng = mlp_rng = None
        if drop_path_rng is not None:
            attn_rng, mlp_rng = jax.random.split(drop_path_rng)
        x_BxNxD = x_BxNxD + drop_path(self.attn(self.norm1(x_BxNxD)), self.drop_path_rate, attn_rng)
        return x_BxNxD + drop_path(self.mlp(self.norm2(x_BxNxD)), self.drop_path_rate, mlp_rng)


class VisionTransformer(nnx.Module):
    """The reference's VisionTransformer with num_classes=0: final-norm CLS features."""

    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
        self.config = config
        dim, patch = config.embed_dim, config.patch_size
        self.dtype = _dtype(config.dtype)
        # The reference never re-initialises the conv, so it keeps PyTorch's default init.
        fan_in = 3 * patch * patch
        self.patch_embed = nnx.Conv(
            3,
            dim,
            kernel_size=(patch, patch),
            strides=(patch, patch),
            padding="VALID",
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=torch_default_uniform_init(fan_in),
            bias_init=torch_default_uniform_init(fan_in),
            rngs=rngs,
        )
        self.cls_token = nnx.Param(normal_init(0.02)(rngs.params(), (1, 1, dim)))
        self.pos_embed = nnx.Param(normal_init(0.02)(rngs.params(), (1, config.num_patches + 1, dim)))
        rates = np.linspace(0.0, config.drop_path_rate, config.depth)
        self.blocks = nnx.List([Block(config, float(rate), rngs=rngs) for rate in rates])
        # Final norm in float32: its output is the feature every evaluator and the head read.
        self.norm = layer_norm(dim, eps=config.layer_norm_eps, dtype=jnp.float32, rngs=rngs)

    def prepare_tokens(self, images_BxHxWxC: jax.Array) -> jax.Array:
        """Patch tokens with the CLS token in front and position embeddings added: (B, 1+h*w, D)."""
        patches_BxhxwxD = self.patch_embed(images_BxHxWxC.astype(self.dtype))
        batch, grid_h, grid_w, dim = patches_BxhxwxD.shape
        cls_Bx1xD = jnp.broadcast_to(self.cls_token[...].astype(self.dtype), (batch, 1, dim))
        tokens = jnp.concatenate([cls_Bx1xD, patches_BxhxwxD.reshape(batch, grid_h * grid_w, dim)], 1)
        pos_embed = self.pos_embed[...]
        # Decided on pixel sizes, as the reference does (`npatch == N and w == h`): a 32 x 35 input
        # floors to the trained 8 x 8 patches of 4 but is not square, so it is resampled.
        height, width = images_BxHxWxC.shape[1:3]
        if not (height == width and grid_h * grid_w == pos_embed.shape[1] - 1):
            pos_embed = interpolate_pos_embed(pos_embed, grid_h, grid_w)
        return tokens + pos_embed.astype(self.dtype)

    def _blocks(self, x: jax.Array, blocks, drop_path_rng: jax.Array | None, first_index: int = 0):
        for index, block in enumerate(blocks, start=first_index):
            rng = None if drop_path_rng is None else jax.random.fold_in(drop_path_rng, index)
            x = block(x, drop_path_rng=rng)
        return x

    def __call__(self, images_BxHxWxC: jax.Array, *, drop_path_rng: jax.Array | None = None) -> jax.Array:
        """Final-norm CLS features (B, D), float32. Stochastic depth only when a key is given."""
        x = self._blocks(self.prepare_tokens(images_BxHxWxC), self.blocks, drop_path_rng)
        return self.norm(x)[:, 0]

    def intermediate_layers(self, images_BxHxWxC: jax.Array, n: int = 1) -> list[jax.Array]:
        """Outputs (B, N+1, D) of the last n blocks, each through the final norm (as the reference)."""
        if not 1 <= n <= len(self.blocks):
            raise ValueError(f"n={n} last blocks requested from a ViT of depth {len(self.blocks)}")
        x = self.prepare_tokens(images_BxHxWxC)
        outputs = []
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index >= len(self.blocks) - n:
                outputs.append(self.norm(x))
        return outputs

    def last_self_attention(self, images_BxHxWxC: jax.Array) -> jax.Array:
        """Softmax attention of the last block, (B, heads, N+1, N+1), float32, no dropout."""

        def forward(model: VisionTransformer, images):
            x = model._blocks(model.prepare_tokens(images), model.blocks[:-1], None)
            last = model.blocks[-1]
            return last.attn(last.norm1(x), record_attention=True)

        _, intermediates = nnx.capture(forward, nnx.Intermediate)(self, images_BxHxWxC)
        (attention,) = intermediates["blocks"][len(self.blocks) - 1]["attn"]["attention"].get_value()
        return attention
