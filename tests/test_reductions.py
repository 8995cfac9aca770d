"""The backend-dependent column reductions agree with numpy's float64 sums to float32 rounding."""

import jax
import jax.numpy as jnp
import numpy as np

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


def test_the_product_form_is_lowered_for_the_cpu_only():
    x = jax.ShapeDtypeStruct((8, 4096), jnp.float32)
    lowered = {
        platform: jax.export.export(jax.jit(reductions.column_sum), platforms=[platform])(x).mlir_module()
        for platform in ("cpu", "cuda", "tpu")
    }
    assert "dot_general" in lowered["cpu"] and "stablehlo.reduce" not in lowered["cpu"]
    for platform in ("cuda", "tpu"):
        assert "stablehlo.reduce" in lowered[platform] and "dot_general" not in lowered[platform]
