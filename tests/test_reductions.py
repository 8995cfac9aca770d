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


def test_one_pass_softmax_statistics_match_float64():
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((3, 5, 4099)) * 20.0).astype(np.float32)
    weights = rng.random((5, 4099)).astype(np.float32)  # broadcasts over the leading axis
    x64 = x.astype(np.float64)
    expected_lse = x64.max(-1, keepdims=True) + np.log(
        np.exp(x64 - x64.max(-1, keepdims=True)).sum(-1, keepdims=True)
    )
    probs = np.exp(x64 - expected_lse)
    lse, entropy, (weighted,) = jax.jit(
        lambda x, w: reductions.softmax_statistics_one_pass(x, entropy=True, plain=[w * x])
    )(x, weights)
    np.testing.assert_allclose(lse, expected_lse, rtol=1e-6)
    np.testing.assert_allclose(
        entropy, -np.sum(probs * np.log(probs), -1, keepdims=True), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(weighted, np.sum(weights * x64, -1, keepdims=True), rtol=1e-5, atol=1e-3)
    lse_only, no_entropy, no_sums = reductions.softmax_statistics_one_pass(x)
    np.testing.assert_array_equal(lse_only, lse)
    assert no_entropy is None and no_sums == []


@pytest.mark.parametrize("size", [16, 8192])
def test_one_pass_softmax_statistics_keep_the_tail_of_a_peaked_row(size):
    # One entry at 0 and the rest at -20: tail mass (size - 1) * 2e-9, below float32's resolution
    # of 1. A sequential sum of exp(x - max) lost all of it (logsumexp exactly 0, entropy 0 at
    # 8192 entries where it is 3.5e-4); summed apart from the max's 1 it is kept.
    x = np.full((1, size), -20.0, np.float32)
    x[0, 5] = 0.0
    x64 = x.astype(np.float64)
    probs = np.exp(x64) / np.exp(x64).sum()
    lse, entropy, _ = jax.jit(lambda x: reductions.softmax_statistics_one_pass(x, entropy=True))(x)
    # What is left is the rounding of a sequential float32 sum of the 8191 tail terms (~5e-5).
    np.testing.assert_allclose(lse, np.log(np.exp(x64).sum()), rtol=2e-4)
    np.testing.assert_allclose(entropy, -np.sum(probs * np.log(probs)), rtol=2e-4)


def test_one_pass_softmax_statistics_of_rows_with_minus_infinity():
    x = np.array([[-np.inf, 3.0, -np.inf, 1.0], [2.0, -np.inf, -np.inf, -np.inf]], np.float32)
    lse, entropy, _ = reductions.softmax_statistics_one_pass(jnp.asarray(x), entropy=True)
    p = np.array([np.exp(3.0), np.exp(1.0)]) / (np.exp(3.0) + np.exp(1.0))
    np.testing.assert_allclose(lse[:, 0], [np.log(np.exp(3.0) + np.exp(1.0)), 2.0], rtol=1e-6)
    np.testing.assert_allclose(entropy[:, 0], [-np.sum(p * np.log(p)), 0.0], atol=1e-6)
