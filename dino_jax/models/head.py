"""DINO projection head: MLP -> L2-normalised bottleneck -> weight-normalised last layer."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from dino_jax.models.vit import COMPUTE_DTYPES, gelu, linear, torch_default_uniform_init


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    """The reference's DINOHead(in_dim, out_dim, use_bn, norm_last_layer, nlayers, hidden_dim,
    bottleneck_dim). `norm_last_layer` is read by the optimizer (it freezes weight_g); the module
    computes the same either way."""

    in_dim: int
    out_dim: int
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    nlayers: int = 3
    use_bn: bool = False
    norm_last_layer: bool = True
    dtype: str = "float32"

    def __post_init__(self):
        if self.nlayers < 1:
            raise ValueError(f"nlayers {self.nlayers} must be at least 1")
        if min(self.in_dim, self.out_dim, self.hidden_dim, self.bottleneck_dim) < 1:
            raise ValueError(f"head sizes must be positive, got {self}")
        if self.dtype not in COMPUTE_DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {COMPUTE_DTYPES}")


class BatchNorm(nnx.Module):
    """BatchNorm1d that always normalises with the statistics of the batch at hand.

    The reference never switches its networks to eval mode, so both student and teacher heads use
    batch statistics (under jit over a sharded batch the mean is global, like SyncBatchNorm).
    Running averages are not kept: DINO training never reads them and evaluation uses the
    backbone only, so they would be dead state in every checkpoint.
    """

    def __init__(self, num_features: int, *, eps: float = 1e-5):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))

    def __call__(self, x_NxF: jax.Array) -> jax.Array:
        x = x_NxF.astype(jnp.float32)
        mean = jnp.mean(x, axis=0)
        variance = jnp.mean(jnp.square(x - mean), axis=0)  # biased, as PyTorch normalises with
        y = (x - mean) * jax.lax.rsqrt(variance + self.eps) * self.scale[...] + self.bias[...]
        return y.astype(x_NxF.dtype)


class WeightNormLinear(nnx.Module):
    """Bias-free Linear with weight = weight_v / ||weight_v|| (per output column) * weight_g.

    weight_v (in, out) keeps PyTorch's default Linear init (the reference creates this layer after
    its own init pass); weight_g (1, out) starts at 1, so outputs of unit inputs are cosines.
    """

    def __init__(self, in_features: int, out_features: int, *, dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        init = torch_default_uniform_init(in_features)
        self.weight_v = nnx.Param(init(rngs.params(), (in_features, out_features)))
        self.weight_g = nnx.Param(jnp.ones((1, out_features), jnp.float32))

    def column_scale(self) -> jax.Array:
        """(1, out): weight_g / ||weight_v|| per output column."""
        v = self.weight_v[...]
        return self.weight_g[...] / jnp.linalg.norm(v, axis=0, keepdims=True)

    def weight(self) -> jax.Array:
        return self.weight_v[...] * self.column_scale()

    def __call__(self, x_NxI: jax.Array) -> jax.Array:
        # x @ (v * s) computed as (x @ v) * s, s the per-column scale: the same product up to
        # rounding (~1e-7 relative), and no scaled copy of the (in, out) weight is made. XLA:CPU's
        # YNNPACK fuses the weight scaling (norm included) into the dot's operand and in effect
        # recomputes it inside the matmul (40x the dot alone at out 65536); the output scale stays
        # an elementwise op on (N, out).
        y_NxO = jnp.dot(
            x_NxI.astype(self.dtype), self.weight_v[...].astype(self.dtype), preferred_element_type=jnp.float32
        )
        return y_NxO * self.column_scale()


class DINOHead(nnx.Module):
    """`__call__(x (N, in_dim)) -> logits (N, out_dim)`, float32."""

    def __init__(self, config: HeadConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype = jnp.dtype(config.dtype)
        self.dtype = dtype
        if config.nlayers == 1:
            sizes = [config.in_dim, config.bottleneck_dim]
        else:
            sizes = [config.in_dim] + [config.hidden_dim] * (config.nlayers - 1) + [config.bottleneck_dim]
        self.mlp = nnx.List([linear(a, b, dtype=dtype, rngs=rngs) for a, b in zip(sizes, sizes[1:])])
        self.bn = nnx.List([BatchNorm(size) for size in sizes[1:-1]] if config.use_bn else [])
        self.last_layer = WeightNormLinear(config.bottleneck_dim, config.out_dim, dtype=dtype, rngs=rngs)

    def __call__(self, x_NxD: jax.Array) -> jax.Array:
        x = x_NxD.astype(self.dtype)
        for index, layer in enumerate(self.mlp):
            x = layer(x)
            if index < len(self.mlp) - 1:
                if self.config.use_bn:
                    x = self.bn[index](x)
                x = gelu(x)  # none after the bottleneck
        x = x.astype(jnp.float32)
        # F.normalize: divide by max(||x||, 1e-12).
        x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
        return self.last_layer(x)
