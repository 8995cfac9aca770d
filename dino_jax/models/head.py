"""DINO projection head: MLP -> L2-normalised bottleneck -> weight-normalised last layer."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from dino_jax import reductions
from dino_jax.models.fused_grads import gelu
from dino_jax.models.layers import linear, torch_default_uniform_init
from dino_jax.models.vit import COMPUTE_DTYPES


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def weight_norm_linear(x_NxI: jax.Array, v_IxO: jax.Array, g_1xO: jax.Array, dtype) -> jax.Array:
    """`x @ (v * g / ||v||)`, column norms of v, products in `dtype`; (N, out) float32 (float16
    values with 16-bit products on a GPU: `half_precision_logits`).

    Computed as `(x @ v) * s` with the per-column scale `s = g / ||v||`: the same product up to
    rounding (~1e-7 relative) without a scaled copy of the (in, out) weight. (XLA:CPU's YNNPACK
    fused the weight scaling, norm included, into the dot and in effect recomputed it inside the
    matmul: 40x the dot alone at out 65536, batch 16.) A GPU scales the weight instead where the
    products are 16-bit, so that the logits leave the matrix kernel final.

    The backward is PyTorch's weight-norm backward: the gradient of the normalised weight,
    `x^T dy`, projected as `s * (dw - v * sum(dw * v) / ||v||^2)`. Autodiff of the forward would
    keep `x @ v` (N, out) for the scale's gradient and reduce over the N rows of `dy * (x @ v)`.
    """
    return _weight_norm_linear_forward(x_NxI, v_IxO, g_1xO, dtype)[0]


def _weight_norm_linear_forward(x_NxI, v_IxO, g_1xO, dtype):
    norm_1xO = reductions.column_norm(v_IxO)
    scale_1xO = g_1xO / norm_1xO
    if jnp.dtype(dtype) == jnp.float32:
        y_NxO = _scaled_output_product(x_NxI, v_IxO, scale_1xO, dtype)
    else:
        y_NxO = jax.lax.platform_dependent(
            x_NxI,
            v_IxO,
            scale_1xO,
            cuda=functools.partial(half_precision_logits, dtype=dtype),
            default=functools.partial(_scaled_output_product, dtype=dtype),
        )
    return y_NxO, (x_NxI, v_IxO, g_1xO, norm_1xO)


def _scaled_output_product(x_NxI, v_IxO, scale_1xO, dtype):
    y_NxO = jnp.dot(x_NxI.astype(dtype), v_IxO.astype(dtype), preferred_element_type=jnp.float32)
    return y_NxO * scale_1xO


def half_precision_logits(x_NxI, v_IxO, scale_1xO, dtype):
    """The 16-bit GPU form of the forward: float32-typed logits holding float16 values.

    `x @ (v * s)` with the (in, out) weight scaled and cast to `dtype` first (its 16.8 M entries,
    not the 168 M of the student's (2560, 65536) output), float32 accumulation, and the result
    rounded to float16, as PyTorch's autocast hands the reference's loss fp16 logits. XLA then
    writes the logits as float16 from the matrix kernel and each reader converts them back: half
    the bytes of float32 logits at every pass over them. float16 keeps 11 significant bits where
    bfloat16 keeps 8; the logits are cosines times g (|y| <= |g|), far inside its range, and are
    clipped to it all the same. Their cotangent stays float32-typed (bfloat16 in the products):
    float16 would flush the loss gradient's smallest entries (~1e-8) to zero without loss scaling.

    Error against float32 (tests/test_head_loss_gpu_forms.py): the head + loss gradients stay
    0.3-1.4% of their largest entry off, as with float32 logits (the bfloat16 products set it);
    bfloat16 logits would have doubled that and quadrupled the loss's error (2e-4 relative).
    """
    weight_IxO = (v_IxO * scale_1xO).astype(dtype)
    y_NxO = jnp.dot(x_NxI.astype(dtype), weight_IxO, preferred_element_type=jnp.float32)
    finite = float(jnp.finfo(jnp.float16).max)
    return jnp.clip(y_NxO, -finite, finite).astype(jnp.float16).astype(jnp.float32)


def _weight_norm_linear_backward(dtype, residuals, dy_NxO):
    x_NxI, v_IxO, g_1xO, norm_1xO = residuals
    scale_1xO = g_1xO / norm_1xO
    dy = dy_NxO.astype(dtype)
    weight_IxO = (v_IxO * scale_1xO).astype(dtype)
    dx_NxI = jnp.dot(dy, weight_IxO.T, preferred_element_type=jnp.float32).astype(x_NxI.dtype)
    dweight_IxO = jnp.dot(x_NxI.astype(dtype).T, dy, preferred_element_type=jnp.float32)
    # As torch's _weight_norm_interface_backward (dim 0 of its (out, in) layout).
    per_column_1xO = reductions.column_sum(dweight_IxO * v_IxO)
    dv_IxO = scale_1xO * (dweight_IxO - v_IxO * (per_column_1xO / (norm_1xO * norm_1xO)))
    dg_1xO = per_column_1xO / norm_1xO
    return dx_NxI, dv_IxO, dg_1xO


weight_norm_linear.defvjp(_weight_norm_linear_forward, _weight_norm_linear_backward)


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

    def weight(self) -> jax.Array:
        v = self.weight_v[...]
        return v * (self.weight_g[...] / jnp.linalg.norm(v, axis=0, keepdims=True))

    def __call__(self, x_NxI: jax.Array) -> jax.Array:
        return weight_norm_linear(x_NxI, self.weight_v[...], self.weight_g[...], self.dtype)


class DINOHead(nnx.Module):
    """`__call__(x (N, in_dim)) -> logits (N, out_dim)`, float32 (float16 values when `dtype` is
    16-bit and the backend a GPU: `half_precision_logits`)."""

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
