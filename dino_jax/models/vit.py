"""Vision Transformer backbone of DINO, numerically faithful to the PyTorch reference.

Layouts are Flax-native: images NHWC, Linear kernels (in, out), the patch conv kernel HWIO.
The module holds only `nnx.Param` state; stochastic depth takes an explicit key at call time, so
`graphdef, params = nnx.split(model)` gives a pure pytree that student and teacher can share.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dino_jax.models import fused_mlp, fused_norm, stacking, triton_tiles
from dino_jax.models.attention import cudnn_attention_available
from dino_jax.models.block import Block, GroupLayout, Mlp, TokenLayout, draw_drop_path_masks
from dino_jax.models.layers import layer_norm, normal_init, torch_default_uniform_init
from dino_jax.models.pos_embed import interpolate_pos_embed

__all__ = ["COMPUTE_DTYPES", "VIT_VARIANTS", "Block", "Mlp", "ViTConfig", "VisionTransformer"]

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
    # Run the blocks as a `lax.scan` over their stack instead of one after another: a program that
    # holds one block instead of `depth` (compile time), at the cost of a loop (bench/gpu_aot.py,
    # docs/benchmarks.md). Parameters and results are the same either way.
    scan_blocks: bool = False
    # Each block as Pallas kernels where the program runs on CUDA in 16 bits, on one device: the
    # attention's input and output (`fused_qkv.py`, `fused_proj.py`) and the MLP branch
    # (`fused_mlp.py`): fewer passes over the token rows. Off by default until timed on a GPU
    # (docs/benchmarks.md).
    pallas_kernels: bool = False

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


class VisionTransformer(nnx.Module):
    """The reference's VisionTransformer with num_classes=0: final-norm CLS features.

    Its blocks are one stack (`self.blocks`, parameters (depth, ...)); `block(i)` is block i."""

    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
        self.config = config
        dim, patch = config.embed_dim, config.patch_size
        self.dtype = jnp.dtype(config.dtype)
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
        # Stochastic depth grows linearly with depth, as in the reference.
        self.drop_path_rates = tuple(float(r) for r in np.linspace(0.0, config.drop_path_rate, config.depth))
        # Built block by block in the reference's order, then stacked: the same initial values as
        # separate blocks.
        self.blocks = stacking.stack([Block(config, rngs=rngs) for _ in range(config.depth)])
        # Final norm in float32: its output is the feature every evaluator and the head read.
        self.norm = layer_norm(dim, eps=config.layer_norm_eps, dtype=jnp.float32, rngs=rngs)

    def block(self, index: int) -> Block:
        """Block `index` (its parameters sliced out of the stack)."""
        return stacking.at(self.blocks, index)

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

    def _rows(
        self, tokens: Sequence[jax.Array], *, pad: bool, shards: int = 1
    ) -> tuple[jax.Array, TokenLayout]:
        """Groups of tokens (B, N, D) -> one (rows, D) matrix and its layout (block.TokenLayout:
        with the batch split over `shards` devices, each device's rows together). With `pad`, an
        odd token count gets one zero token (cuDNN's attention needs even counts, attention.py),
        masked out of attention and never read back (its row only goes through per-token layers)."""
        rows, groups = [], []
        for tokens_BxNxD in tokens:
            batch, count, dim = tokens_BxNxD.shape
            if pad and count % 2:
                tokens_BxNxD = jnp.pad(tokens_BxNxD, ((0, 0), (0, 1), (0, 0)))
            groups.append(GroupLayout(batch, tokens_BxNxD.shape[1], count))
            rows.append(tokens_BxNxD.reshape(-1, dim))
        layout = TokenLayout(tuple(groups), shards)
        return layout.join(rows), layout

    def run_blocks(
        self,
        x_RxD: jax.Array,
        layout: TokenLayout,
        *,
        fused_attention: bool = False,
        pallas: bool = False,
        keep_masks: jax.Array | None = None,
        stop: int | None = None,
    ) -> jax.Array:
        """Blocks 0 .. stop-1 (all by default) on token rows; `keep_masks` (depth, 2, images) from
        `block.draw_drop_path_masks` (None: no stochastic depth)."""
        stop = self.config.depth if stop is None else stop
        if self.config.scan_blocks and stop > 1:
            return self._scan_blocks(x_RxD, layout, fused_attention, pallas, keep_masks, stop)
        for index in range(stop):
            x_RxD = self.block(index)(
                x_RxD,
                layout,
                fused_attention=fused_attention,
                pallas=pallas,
                drop_path_rate=self.drop_path_rates[index],
                keep_branches=None if keep_masks is None else keep_masks[index],
            )
        return x_RxD

    def _scan_blocks(self, x_RxD, layout, fused_attention, pallas, keep_masks, stop: int) -> jax.Array:
        """`run_blocks` as one `lax.scan` over the stack: the program holds one block, not `stop`."""
        graphdef, state = nnx.split(self.blocks)
        state = jax.tree.map(lambda array: array[:stop], state)
        rates = jnp.asarray(self.drop_path_rates[:stop], jnp.float32)
        masks = None if keep_masks is None else keep_masks[:stop]

        def body(x_RxD, per_block):
            block_state, rate, keep_branches = per_block
            block = nnx.merge(graphdef, block_state)
            out = block(
                x_RxD,
                layout,
                fused_attention=fused_attention,
                pallas=pallas,
                drop_path_rate=rate,
                keep_branches=keep_branches,
            )
            return out, None

        x_RxD, _ = jax.lax.scan(body, x_RxD, (state, rates, masks))
        return x_RxD

    def pallas_kernels_available(self) -> bool:
        """`config.pallas_kernels`, and the Pallas kernels take this block's widths, lower here, and
        run on this process's devices: one device (a data-parallel batch may reach the model with
        `shards=1`, as evaluation calls it), no GPU older than XLA's Triton floor."""
        config = self.config
        return bool(
            config.pallas_kernels
            and fused_mlp.supported(config.embed_dim, config.mlp_hidden_dim)
            and fused_norm.supported(config.embed_dim)
            and triton_tiles.triton_available()
            and jax.device_count() == 1
            and not triton_tiles.gpus_too_old(jax.devices())
        )

    def _features(
        self, *tokens, fused_attention: bool, joint_rows: bool, drop_path_rng, shards: int
    ) -> list[jax.Array]:
        """Final-norm CLS features of each group of tokens. `joint_rows`: every group's tokens
        through the blocks as one matrix of rows (block.py); else group after group, each its own
        rows. The arithmetic of every token, and its stochastic depth, is the same either way."""
        # The Pallas kernels go with the CUDA 16-bit form (the one that takes cuDNN's attention),
        # on one device: XLA does not partition a Pallas call, it would gather every device's rows
        # onto each (splitting it needs a shard_map, not written yet).
        pallas = fused_attention and shards == 1 and self.pallas_kernels_available()
        keep_masks = None
        if drop_path_rng is not None:
            images = sum(tokens_BxNxD.shape[0] for tokens_BxNxD in tokens)
            keep_masks = draw_drop_path_masks(drop_path_rng, self.drop_path_rates, images)
        runs = [tokens] if joint_rows else [[tokens_BxNxD] for tokens_BxNxD in tokens]
        features, first = [], 0
        for run in runs:
            x_RxD, layout = self._rows(run, pad=fused_attention, shards=shards)
            # Images are numbered group after group (draw_drop_path_masks): this run's slice.
            masks = None if keep_masks is None else keep_masks[:, :, first : first + layout.images]
            first += layout.images
            x_RxD = self.run_blocks(
                x_RxD, layout, fused_attention=fused_attention, pallas=pallas, keep_masks=masks
            )
            # The final norm of the CLS tokens only: it works token by token, so norm(x)[:, 0] of
            # the reference is norm(x[:, 0]), without a pass over every token.
            features += [self.norm(group[:, 0]) for group in layout.split(x_RxD)]
        return features

    def forward_groups(
        self, groups: Sequence[jax.Array], drop_path_rng: jax.Array | None = None, *, shards: int = 1
    ) -> list[jax.Array]:
        """Final-norm CLS features (B_i, D), float32, of several groups of images (each group one
        image size). Stochastic depth only with a key. `shards`: the devices the batch is split
        over (each keeps its rows).

        The form is chosen where the step is lowered (`lax.platform_dependent`), so one traced step
        serves every backend:
        - CUDA in bfloat16/float16: the groups' tokens through the blocks as one matrix of rows
          (one kernel per token-wise operation for all groups), cuDNN's fused attention on tokens
          padded to an even count;
        - TPU, and CUDA in float32: joint rows, the written-out attention;
        - CPU: group after group. XLA:CPU copies the rows to join and split them where a GPU
          compiler reads them in place, and has no launch cost to save: the CIFAR student's forward
          and backward took ~5% longer with joint rows (docs/benchmarks.md)."""
        tokens = [self.prepare_tokens(images) for images in groups]
        features = functools.partial(self._features, drop_path_rng=drop_path_rng, shards=shards)
        branches = {"default": functools.partial(features, fused_attention=False, joint_rows=True)}
        if len(tokens) > 1:  # (one group: the two forms are one program)
            branches["cpu"] = functools.partial(features, fused_attention=False, joint_rows=False)
        if cudnn_attention_available(self.dtype.name):
            branches["cuda"] = functools.partial(features, fused_attention=True, joint_rows=True)
        if len(branches) == 1:
            return branches["default"](*tokens)
        return jax.lax.platform_dependent(*tokens, **branches)

    def __call__(self, images_BxHxWxC: jax.Array, *, drop_path_rng: jax.Array | None = None) -> jax.Array:
        """Final-norm CLS features (B, D), float32. Stochastic depth only when a key is given."""
        return self.forward_groups([images_BxHxWxC], drop_path_rng)[0]

    def intermediate_layers(self, images_BxHxWxC: jax.Array, n: int = 1) -> list[jax.Array]:
        """Outputs (B, N+1, D) of the last n blocks, each through the final norm (as the reference)."""
        depth = self.config.depth
        if not 1 <= n <= depth:
            raise ValueError(f"n={n} last blocks requested from a ViT of depth {depth}")
        x_RxD, layout = self._rows([self.prepare_tokens(images_BxHxWxC)], pad=False)
        x_RxD = self.run_blocks(x_RxD, layout, stop=depth - n)
        outputs = []
        for index in range(depth - n, depth):
            x_RxD = self.block(index)(x_RxD, layout)
            outputs.append(layout.split(self.norm(x_RxD))[0])
        return outputs

    def last_self_attention(self, images_BxHxWxC: jax.Array) -> jax.Array:
        """Softmax attention of the last block, (B, heads, N+1, N+1), float32, no dropout."""
        x_RxD, layout = self._rows([self.prepare_tokens(images_BxHxWxC)], pad=False)
        x_RxD = self.run_blocks(x_RxD, layout, stop=self.config.depth - 1)

        def attend(block: Block, x_RxD):
            return block.attn(block.norm1(x_RxD), layout, record_attention=True)

        _, intermediates = nnx.capture(attend, nnx.Intermediate)(self.block(self.config.depth - 1), x_RxD)
        (attention,) = intermediates["attn"]["attention"].get_value()
        return attention
