"""Multi-head self-attention, and the form its core `softmax(q k^T / sqrt(d)) v` takes per backend.

- CPU, TPU, and float32 anywhere: the products and the softmax written out, heads-major
  (B, H, N, K), logits and probabilities in float32. On XLA:CPU this layout keeps both batched
  products and the softmax on contiguous tiles (a block's forward on 128 x 65 tokens: 65 ms with the
  heads inside the token axis, 53 ms heads-major; docs/benchmarks.md). The attention maps are read
  from this form (`record_attention`).
- CUDA in bfloat16/float16: cuDNN's fused attention (flash attention: one kernel forward, the
  probabilities never written out). The ViT chooses it when the program is lowered
  (`lax.platform_dependent` in vit.py), so one traced step serves any backend. Numerics: float32
  softmax statistics inside the kernel and the probabilities rounded to the compute dtype before
  the product with v, as the written-out form does; no reference tolerance is changed (the parity
  tests run on the CPU in float32, where this form is never taken).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from dino_jax.models.layers import linear

_FUSED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def heads_major_attention(q_BxNxHxK, k_BxNxHxK, v_BxNxHxK, scale: float) -> tuple[jax.Array, jax.Array]:
    """`(out (B, N, H, K) in q's dtype, probabilities (B, H, N, N) float32)`."""
    q_BxHxNxK, k_BxHxNxK, v_BxHxNxK = (t.transpose(0, 2, 1, 3) for t in (q_BxNxHxK, k_BxNxHxK, v_BxNxHxK))
    logits_BxHxNxN = jnp.einsum(
        "bhqk,bhtk->bhqt",
        q_BxHxNxK * jnp.asarray(scale, q_BxHxNxK.dtype),
        k_BxHxNxK,
        preferred_element_type=jnp.float32,
    )
    probs_BxHxNxN = jax.nn.softmax(logits_BxHxNxN, axis=-1)
    out_BxHxNxK = jnp.einsum("bhqt,bhtk->bhqk", probs_BxHxNxN.astype(v_BxHxNxK.dtype), v_BxHxNxK)
    return out_BxHxNxK.transpose(0, 2, 1, 3), probs_BxHxNxN


def cudnn_attention(
    q_BxNxHxK, k_BxNxHxK, v_BxNxHxK, scale: float, valid_tokens: int | None = None
) -> jax.Array:
    """cuDNN's fused attention, (B, N, H, K); keys past `valid_tokens` are masked out.

    The token count must be even: jax 0.10's cuDNN path checks every training call as if it had a
    bias, and cuDNN needs even lengths with a bias. The ViT pads its tokens once, before the blocks,
    where this path is taken (`vit.py`); an odd count here is padded by one token and cut again.
    """
    batch, tokens = q_BxNxHxK.shape[:2]
    valid = tokens if valid_tokens is None else valid_tokens
    if tokens % 2:
        pad = ((0, 0), (0, 1), (0, 0), (0, 0))
        q_BxNxHxK, k_BxNxHxK, v_BxNxHxK = (jnp.pad(t, pad) for t in (q_BxNxHxK, k_BxNxHxK, v_BxNxHxK))
    padded = q_BxNxHxK.shape[1]
    lengths = None if valid == padded else jnp.full((batch,), valid, jnp.int32)
    out = jax.nn.dot_product_attention(
        q_BxNxHxK,
        k_BxNxHxK,
        v_BxNxHxK,
        scale=scale,
        key_value_seq_lengths=lengths,
        implementation="cudnn",
    )
    return out[:, :tokens]


@functools.cache
def cudnn_attention_available(dtype_name: str) -> bool:
    """Whether cuDNN's fused attention can be traced here in `dtype_name`: a 16-bit dtype, and
    JAX's CUDA plugin installed (it brings the cuDNN bindings; no GPU need be present, so a CPU
    machine with the plugin compiles GPU programs with it). Tested by tracing one tiny call."""
    if jnp.dtype(dtype_name) not in _FUSED_DTYPES:
        return False
    shape = jax.ShapeDtypeStruct((1, 2, 1, 8), jnp.dtype(dtype_name))
    try:
        jax.eval_shape(lambda q: cudnn_attention(q, q, q, 1.0), shape)
    except Exception:  # no cuDNN bindings: RuntimeError, ImportError or NotImplementedError
        return False
    return True


class Attention(nnx.Module):
    """Multi-head self-attention; qkv kernel columns are [q | k | v], each split by head."""

    def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool, dtype, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.dtype = dtype
        self.qkv = linear(dim, 3 * dim, use_bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.proj = linear(dim, dim, dtype=dtype, rngs=rngs)

    def __call__(
        self, x_RxD: jax.Array, layout, *, fused: bool = False, record_attention: bool = False
    ) -> jax.Array:
        """Token rows (R, D) of the groups in `layout` (block.TokenLayout) -> (R, D); each group
        attends within its images. `fused`: cuDNN's kernel (a CUDA program in 16-bit); else the
        written-out heads-major form, whose probabilities `record_attention` sows."""
        head_dim = x_RxD.shape[-1] // self.num_heads
        groups = []
        for group, qkv_BxNx3D in zip(layout.groups, layout.split(self.qkv(x_RxD))):
            qkv = qkv_BxNx3D.reshape(group.batch, group.tokens, 3, self.num_heads, head_dim)
            groups.append((qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]))
        outputs = self.group_outputs(groups, layout, fused=fused, record_attention=record_attention)
        # One projection over every group's rows (XLA reads the pieces in place).
        return self.proj(layout.join(outputs))

    def group_outputs(self, groups_qkv, layout, *, fused: bool = False, record_attention: bool = False):
        """Each group's attention output before the projection, (rows_g, D)."""
        outputs = []
        for group, (q, k, v) in zip(layout.groups, groups_qkv):
            if record_attention:
                out_BxNxHxK, probs_BxHxNxN = heads_major_attention(q, k, v, self.scale)
                self.sow(nnx.Intermediate, "attention", probs_BxHxNxN)
            elif fused:
                out_BxNxHxK = cudnn_attention(q, k, v, self.scale, group.valid)
            else:
                out_BxNxHxK = heads_major_attention(q, k, v, self.scale)[0]
            outputs.append(out_BxNxHxK.reshape(group.rows, -1))
        return outputs
