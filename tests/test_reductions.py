"""The backend-dependent column and row reductions agree with numpy's float64 sums to float32 rounding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dino_jax import reductions


def test_column_sum_mean_and_norm_match_float64():
    x = np.random.default_rng(0).standard_normal((37, 4099)).astype(np.float32)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(
        jax.jit(reductions.column_sum)(x), x64.sum(0, keepdims=True), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(reductions.column_mean(jnp.asarray(x)), x64.mean(0, keepdims=True), atol=1e-6)
    np.testing.assert_allclose(
        reductions.column_norm(jnp.asarray(x)), np.linalg.norm(x64, axis=0, keepdims=True), rtol=1e-6
    )


def test_column_sum_gradient_is_ones():
    x = jnp.ones((5, 3))
    np.testing.assert_array_equal(jax.grad(lambda x: jnp.sum(reductions.column_sum(x) * 2.0))(x), 2.0)


def test_row_sum_logsumexp_and_softmax_match_float64():
    x = (np.random.default_rng(1).standard_normal((3, 5, 4099)) * 20.0).astype(np.float32)
    x64 = x.astype(np.float64)
    shifted = x64 - x64.max(-1, keepdims=True)
    expected_lse = x64.max(-1, keepdims=True) + np.log(np.exp(shifted).sum(-1, keepdims=True))
    np.testing.assert_allclose(
        jax.jit(reductions.row_sum)(x), x64.sum(-1, keepdims=True), rtol=1e-5, atol=1e-3
    )
    np.testing.assert_allclose(jax.jit(reductions.logsumexp)(x), expected_lse, rtol=1e-6)
    np.testing.assert_allclose(
        jax.jit(reductions.softmax)(x), np.exp(x64 - expected_lse), rtol=1e-5, atol=1e-7
    )
    # Differentiable like jax.nn's: the gradient of logsumexp is the softmax.
    np.testing.assert_allclose(
        jax.grad(lambda x: jnp.sum(reductions.logsumexp(x)))(jnp.asarray(x)),
        np.exp(x64 - expected_lse),
        atol=1e-6,
    )


@pytest.mark.parametrize(
    "reduction, shape",
    [
        (reductions.column_sum, (8, 4096)),
        (reductions.row_sum, (8, 4096)),
        (reductions.logsumexp, (2, 8, 4096)),
    ],
)
def test_the_product_form_is_lowered_for_the_cpu_only(reduction, shape):
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    lowered = {
        platform: jax.export.export(jax.jit(reduction), platforms=[platform])(x).mlir_module()
        for platform in ("cpu", "cuda", "tpu")
    }
    # logsumexp keeps its row max (a reduce) on every backend; the sum is what changes.
    reduces = {platform: text.count("stablehlo.reduce") for platform, text in lowered.items()}
    assert "dot_general" in lowered["cpu"]
    for platform in ("cuda", "tpu"):
        assert "dot_general" not in lowered[platform]
        assert reduces[platform] == reduces["cpu"] + 1
