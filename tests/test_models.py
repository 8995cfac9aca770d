"""Unit tests of the ViT, the DINO head and the multi-crop wrapper, on tiny variants."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dino_jax.models import fused_grads, layers, stacking
from dino_jax.models import vit as vit_lib
from dino_jax.models import block as block_lib
from dino_jax.models.block import GroupLayout, TokenLayout
from dino_jax.models.dino import DINO
from dino_jax.models.head import BatchNorm, DINOHead, HeadConfig, weight_norm_linear
from dino_jax.models.vit import VisionTransformer, ViTConfig

TINY = ViTConfig(image_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)


pytestmark = pytest.mark.usefixtures("fast_compilation")


def images(key, batch=2, size=16):
    return jax.random.normal(jax.random.key(key), (batch, size, size, 3))


# Forward passes go through jit: op-by-op dispatch compiles every primitive per new shape, which
# costs several seconds per test on a 2-core machine.
@nnx.jit
def features(model, x, rng=None):
    return model(x, drop_path_rng=rng)


@nnx.jit
def attention_of(model, x):
    return model.last_self_attention(x)


@nnx.jit(static_argnames="n")
def layers_of(model, x, n):
    return model.intermediate_layers(x, n)


def flat_params(model):
    """`{name: array}`, the stacked blocks one at a time (`blocks.0.attn.qkv.kernel`)."""
    _, params = nnx.split(model)
    flat = stacking.per_block({path: variable[...] for path, variable in nnx.to_flat_state(params)})
    return {".".join(map(str, path)): value for path, value in flat.items()}


@pytest.fixture(scope="module")
def tiny_vit():
    return VisionTransformer(TINY, rngs=nnx.Rngs(0))


def test_variants_and_validation():
    small = ViTConfig.from_variant("small", patch_size=8, image_size=32)
    assert (small.embed_dim, small.depth, small.num_heads, small.grid_size) == (384, 12, 6, 4)
    assert ViTConfig.from_variant("base").num_patches == 196
    with pytest.raises(ValueError, match="unknown ViT variant 'huge'"):
        ViTConfig.from_variant("huge")
    with pytest.raises(ValueError, match="not a positive multiple of patch_size 5"):
        ViTConfig(image_size=16, patch_size=5, embed_dim=32, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="dtype 'float64'"):
        ViTConfig(image_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, dtype="float64")


def test_output_shapes(tiny_vit):
    x = images(0, batch=3)
    assert features(tiny_vit, x).shape == (3, 32)
    layers = layers_of(tiny_vit, x, n=2)
    assert [layer.shape for layer in layers] == [(3, 17, 32)] * 2
    assert attention_of(tiny_vit, x).shape == (3, 2, 17, 17)
    # A local crop of another size, and a non-square image, interpolate the position embedding.
    assert features(tiny_vit, images(1, size=8)).shape == (2, 32)
    assert attention_of(tiny_vit, jnp.zeros((1, 12, 8, 3))).shape == (1, 2, 7, 7)


def test_features_are_final_norm_of_last_layer(tiny_vit):
    x = images(2)
    np.testing.assert_allclose(features(tiny_vit, x), layers_of(tiny_vit, x, n=1)[0][:, 0], atol=1e-6)


def test_attention_rows_sum_to_one_and_match_manual_qkv_layout():
    config = ViTConfig(image_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2)
    model = VisionTransformer(config, rngs=nnx.Rngs(1))
    x = images(3)
    attention = np.asarray(attention_of(model, x))
    np.testing.assert_allclose(attention.sum(-1), 1.0, atol=1e-5)
    # Manual attention with the documented layout: kernel columns [q | k | v], head h in columns
    # h*hd:(h+1)*hd of each, scale hd**-0.5.
    block = model.block(0)
    tokens = block.norm1(model.prepare_tokens(x))
    qkv = tokens @ block.attn.qkv.kernel[...] + block.attn.qkv.bias[...]
    dim, heads = 32, 2
    head_dim = dim // heads
    for h in range(heads):
        cols = slice(h * head_dim, (h + 1) * head_dim)
        q = qkv[..., :dim][..., cols]
        k = qkv[..., dim : 2 * dim][..., cols]
        expected = jax.nn.softmax(q @ k.transpose(0, 2, 1) * head_dim**-0.5, axis=-1)
        np.testing.assert_allclose(attention[:, h], expected, atol=1e-6)


def test_mlp_uses_exact_gelu():
    mlp = vit_lib.Mlp(TINY.embed_dim, TINY.mlp_hidden_dim, dtype=jnp.float32, rngs=nnx.Rngs(0))
    # Weights of order 1 so that hidden units span the range where the two GELUs differ (~1e-3).
    mlp.fc1.kernel[...] = jax.random.normal(jax.random.key(4), (32, 128)) / math.sqrt(32)
    mlp.fc2.kernel[...] = jax.random.normal(jax.random.key(5), (128, 32))
    x = 2.0 * jax.random.normal(jax.random.key(6), (4, 32))
    hidden = np.asarray(x @ mlp.fc1.kernel[...], np.float64)
    fc2 = np.asarray(mlp.fc2.kernel[...], np.float64)
    erf = np.vectorize(math.erf)
    expected = (0.5 * hidden * (1.0 + erf(hidden / math.sqrt(2.0)))) @ fc2
    np.testing.assert_allclose(mlp(x), expected, atol=1e-4)
    tanh = np.asarray(jax.nn.gelu(hidden, approximate=True)) @ fc2
    assert np.abs(tanh - expected).max() > 1e-3


def test_gelu_and_its_gradient_match_the_exact_gelu_in_float64():
    x = jnp.linspace(-6.0, 6.0, 2001, dtype=jnp.float32)
    x64 = np.asarray(x, np.float64)
    erf = np.vectorize(math.erf)
    expected = 0.5 * x64 * (1.0 + erf(x64 / math.sqrt(2.0)))
    # d/dx x/2 (1 + erf(x / sqrt 2)) = (1 + erf(x / sqrt 2)) / 2 + x exp(-x^2 / 2) / sqrt(2 pi)
    density = np.exp(-0.5 * x64**2) / math.sqrt(2 * math.pi)
    expected_grad = 0.5 * (1.0 + erf(x64 / math.sqrt(2.0))) + x64 * density
    np.testing.assert_allclose(fused_grads.gelu(x), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(jax.vmap(jax.grad(fused_grads.gelu))(x), expected_grad, rtol=1e-6, atol=1e-6)
    # The erf form loses the far negative tail to cancellation (-0 for ~-1e-7), as torch's does.
    np.testing.assert_allclose(fused_grads.gelu(x), jax.nn.gelu(x, approximate=False), rtol=1e-6, atol=1e-6)


def test_drop_path_is_per_image_across_groups_and_rescaled():
    # Two groups: 3 images of 2 tokens, then 2 images of 3 tokens; images 1 and 3 are dropped.
    layout = TokenLayout((GroupLayout(batch=3, tokens=2, valid=2), GroupLayout(batch=2, tokens=3, valid=3)))
    x = jnp.ones((12, 4))
    keep = jnp.asarray([True, False, True, False, True])
    out = np.asarray(block_lib.drop_path_rows(x, layout, 0.5, keep))
    per_row = out[:, 0]
    expected_rows = [2, 2, 0, 0, 2, 2] + [0, 0, 0, 2, 2, 2]
    np.testing.assert_array_equal(per_row, expected_rows)
    assert np.all(out == out[:, :1])
    assert block_lib.drop_path_rows(x, layout, 0.5, None) is x
    assert block_lib.drop_path_rows(x, layout, 0.0, keep) is x


def test_stochastic_depth_only_with_a_key():
    config = ViTConfig(image_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2, drop_path_rate=0.5)
    model = VisionTransformer(config, rngs=nnx.Rngs(2))
    assert model.drop_path_rates == (0.0, 0.25, 0.5)
    x = images(5, batch=16)
    plain = np.asarray(features(model, x))
    np.testing.assert_array_equal(plain, np.asarray(features(model, x)))
    dropped = np.asarray(features(model, x, jax.random.key(0)))
    again = np.asarray(features(model, x, jax.random.key(0)))
    other = np.asarray(features(model, x, jax.random.key(1)))
    np.testing.assert_array_equal(dropped, again)
    assert not np.allclose(dropped, other)
    assert not np.allclose(dropped, plain)
    # Per sample: a row whose two branches are both dropped leaves the block unchanged.
    block = model.block(2)
    tokens = jax.random.normal(jax.random.key(6), (32 * 5, 32))
    layout = TokenLayout((GroupLayout(batch=32, tokens=5, valid=5),))
    masks = block_lib.draw_drop_path_masks(jax.random.key(3), [0.5], 32)[0]
    out = np.asarray(block(tokens, layout, drop_path_rate=0.5, keep_branches=masks))
    untouched = np.all((out == np.asarray(tokens)).reshape(32, 5 * 32), axis=1)
    assert untouched.any() and not untouched.all()


@pytest.mark.parametrize("grid, out_h, out_w", [(8, 4, 4), (8, 6, 5), (14, 12, 12), (4, 8, 8), (8, 8, 8)])
def test_pos_embed_interpolation_matches_torch(grid, out_h, out_w):
    torch = pytest.importorskip("torch")
    pos_embed = (
        np.random.default_rng(grid * out_w).standard_normal((1, grid * grid + 1, 5)).astype(np.float32)
    )
    patch = torch.from_numpy(pos_embed[:, 1:]).reshape(1, grid, grid, 5).permute(0, 3, 1, 2)
    resized = torch.nn.functional.interpolate(
        patch, scale_factor=((out_h + 0.1) / grid, (out_w + 0.1) / grid), mode="bicubic", align_corners=False
    )
    expected = np.concatenate(
        [pos_embed[:, :1], resized.permute(0, 2, 3, 1).reshape(1, -1, 5).numpy()], axis=1
    )
    ours = np.asarray(vit_lib.interpolate_pos_embed(jnp.asarray(pos_embed), out_h, out_w))
    # Weights agree bit for bit; what remains is float32 summation order on values of size ~3.
    np.testing.assert_allclose(ours, expected, rtol=0, atol=3e-6)


def test_pos_embed_is_resampled_even_to_its_own_grid():
    # prepare_tokens decides whether to call it; when it does (a non-square input that floors to
    # the trained grid), the +0.1 offset moves the sample points, as in the reference.
    pos_embed = jnp.arange(17 * 2, dtype=jnp.float32).reshape(1, 17, 2) ** 2
    for out_h, out_w in ((4, 4), (2, 8)):
        resized = vit_lib.interpolate_pos_embed(pos_embed, out_h, out_w)
        np.testing.assert_array_equal(resized[:, 0], pos_embed[:, 0])
        assert not np.allclose(resized[:, 1:], pos_embed[:, 1:])


def test_init_statistics():
    config = ViTConfig(image_size=32, patch_size=4, embed_dim=96, depth=1, num_heads=2)
    params = flat_params(VisionTransformer(config, rngs=nnx.Rngs(3)))
    qkv = np.asarray(params["blocks.0.attn.qkv.kernel"][...])
    assert qkv.shape == (96, 288)
    assert abs(qkv.std() - 0.02) < 0.001 and abs(qkv.mean()) < 0.001
    # Not cut at 2 sigma (jax's truncated_normal would be): ~4.6% of normal draws lie beyond.
    assert np.mean(np.abs(qkv) > 0.04) > 0.03
    pos = np.asarray(params["pos_embed"][...])
    assert pos.shape == (1, 65, 96) and abs(pos.std() - 0.02) < 0.002
    assert abs(np.asarray(params["cls_token"][...]).std() - 0.02) < 0.006
    for name in ["blocks.0.attn.qkv.bias", "blocks.0.mlp.fc1.bias", "norm.bias", "blocks.0.norm1.bias"]:
        np.testing.assert_array_equal(params[name][...], 0.0)
    np.testing.assert_array_equal(params["blocks.0.norm2.scale"][...], 1.0)
    bound = 1 / math.sqrt(3 * 4 * 4)
    conv = np.asarray(params["patch_embed.kernel"][...])
    assert conv.shape == (4, 4, 3, 96) and np.abs(conv).max() <= bound
    assert abs(conv.std() - bound / math.sqrt(3)) < 0.05 * bound
    conv_bias = np.asarray(params["patch_embed.bias"][...])
    assert np.abs(conv_bias).max() <= bound and conv_bias.std() > 0.3 * bound


def test_params_only_and_jit_of_merge(tiny_vit):
    graphdef, params = nnx.split(tiny_vit)
    for _, variable in nnx.to_flat_state(params):
        assert type(variable) is nnx.Param and variable[...].dtype == jnp.float32
    x = images(6)

    @jax.jit
    def forward(params, x, rng):
        model = nnx.merge(graphdef, params)
        return model(x, drop_path_rng=rng), model.last_self_attention(x)

    cls, attention = forward(params, x, jax.random.key(0))
    # Drop-path rate 0: the key changes nothing.
    np.testing.assert_allclose(cls, features(tiny_vit, x), atol=1e-5)
    assert attention.shape == (2, 2, 17, 17)
    # Running the model (with attention capture) added no state to it.
    _, params_after = nnx.split(tiny_vit)
    assert len(jax.tree.leaves(params_after)) == len(jax.tree.leaves(params))


def test_bfloat16_compute_keeps_float32_params():
    config = ViTConfig(image_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, dtype="bfloat16")
    model = VisionTransformer(config, rngs=nnx.Rngs(0))
    reference = VisionTransformer(TINY, rngs=nnx.Rngs(0))
    for _, variable in nnx.to_flat_state(nnx.split(model)[1]):
        assert variable[...].dtype == jnp.float32
    x = images(7)
    out = features(model, x)
    assert out.dtype == jnp.float32
    assert attention_of(model, x).dtype == jnp.float32
    np.testing.assert_allclose(out, features(reference, x), atol=0.1)


def head_config(**overrides):
    return HeadConfig(**{"in_dim": 32, "out_dim": 64, "hidden_dim": 48, "bottleneck_dim": 16, **overrides})


def test_head_shapes_init_and_weight_norm():
    head = DINOHead(head_config(), rngs=nnx.Rngs(0))
    params = flat_params(head)
    assert [name for name in params if name.startswith("mlp.")] == [
        "mlp.0.bias",
        "mlp.0.kernel",
        "mlp.1.bias",
        "mlp.1.kernel",
        "mlp.2.bias",
        "mlp.2.kernel",
    ]
    assert params["mlp.1.kernel"][...].shape == (48, 48)
    assert params["mlp.2.kernel"][...].shape == (48, 16)
    assert params["last_layer.weight_v"][...].shape == (16, 64)
    np.testing.assert_array_equal(params["last_layer.weight_g"][...], np.ones((1, 64)))
    v = np.asarray(params["last_layer.weight_v"][...])
    assert np.abs(v).max() <= 0.25 and v.std() > 0.1  # uniform(+-1/sqrt(16))
    np.testing.assert_allclose(np.linalg.norm(head.last_layer.weight(), axis=0), 1.0, atol=1e-6)
    logits = np.asarray(head(10 * jax.random.normal(jax.random.key(1), (8, 32))))
    assert logits.shape == (8, 64) and np.abs(logits).max() <= 1.0 + 1e-6
    # weight_g scales each output column.
    ones = jnp.ones((2, 32))
    unit_logits = head(ones)
    head.last_layer.weight_g[...] = jnp.full((1, 64), 2.0)
    np.testing.assert_allclose(head(ones), 2 * unit_logits, rtol=1e-6)


def test_head_single_layer_and_no_activation_after_bottleneck():
    head = DINOHead(head_config(nlayers=1), rngs=nnx.Rngs(0))
    assert len(head.mlp) == 1 and head.mlp[0].kernel[...].shape == (32, 16)
    x = jax.random.normal(jax.random.key(2), (4, 32))
    bottleneck = x @ head.mlp[0].kernel[...]
    bottleneck = bottleneck / jnp.linalg.norm(bottleneck, axis=-1, keepdims=True)
    np.testing.assert_allclose(head(x), bottleneck @ head.last_layer.weight(), atol=1e-6)


def test_layer_norm_and_its_written_out_gradients_match_autodiff_of_the_formula():
    rng = np.random.default_rng(0)
    # An offset mean and uneven scale, where a one-pass variance would lose digits.
    x = jnp.asarray(rng.standard_normal((3, 5, 48)) * 4.0 + 30.0, jnp.float32)
    scale = jnp.asarray(rng.uniform(0.5, 2.0, 48), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(48), jnp.float32)
    dy = jnp.asarray(rng.standard_normal((3, 5, 48)), jnp.float32)

    def formula(x, scale, bias):
        centred = x - x.mean(-1, keepdims=True)
        return centred / jnp.sqrt((centred**2).mean(-1, keepdims=True) + 1e-6) * scale + bias

    expected_y, expected_vjp = jax.vjp(formula, x, scale, bias)
    y, vjp = jax.vjp(lambda x, s, b: fused_grads.layer_norm(x, s, b, 1e-6), x, scale, bias)
    np.testing.assert_allclose(y, expected_y, rtol=1e-5, atol=1e-5)
    for name, got, want in zip(("x", "scale", "bias"), vjp(dy), expected_vjp(dy)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=f"gradient of {name}")

    module = fused_grads.LayerNorm(48, epsilon=1e-6, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    module.scale[...], module.bias[...] = scale, bias
    flax_norm = nnx.LayerNorm(48, epsilon=1e-6, use_fast_variance=False, rngs=nnx.Rngs(0))
    flax_norm.scale[...], flax_norm.bias[...] = scale, bias
    np.testing.assert_allclose(module(x), flax_norm(x), rtol=1e-5, atol=1e-5)
    module.dtype = jnp.bfloat16
    assert module(x).dtype == jnp.bfloat16


def test_token_linear_flattens_tokens_and_matches_the_3d_product():
    layer = layers.linear(16, 24, dtype=jnp.float32, rngs=nnx.Rngs(0))
    layer.bias[...] = jnp.arange(24, dtype=jnp.float32) / 10
    graphdef, params = nnx.split(layer)
    x = jax.random.normal(jax.random.key(1), (3, 7, 16))

    def through_layer(params, x):
        return jnp.sum(jnp.sin(nnx.merge(graphdef, params)(x)))

    def three_d(params, x):
        return jnp.sum(jnp.sin(jnp.einsum("bnd,de->bne", x, params["kernel"][...]) + params["bias"][...]))

    assert layer(x).shape == (3, 7, 24)
    np.testing.assert_allclose(through_layer(params, x), three_d(params, x), rtol=1e-5)
    got, want = jax.grad(through_layer, (0, 1))(params, x), jax.grad(three_d, (0, 1))(params, x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_weight_norm_linear_gradients_match_autodiff_of_the_weight_form():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((40, 16)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((16, 300)), jnp.float32)
    g = jnp.asarray(rng.uniform(0.5, 2.0, (1, 300)), jnp.float32)
    dy = jnp.asarray(rng.standard_normal((40, 300)), jnp.float32)

    def weight_form(x, v, g):
        return x @ (v * g / jnp.linalg.norm(v, axis=0, keepdims=True))

    expected_y, expected_vjp = jax.vjp(weight_form, x, v, g)
    y, vjp = jax.vjp(lambda x, v, g: weight_norm_linear(x, v, g, jnp.float32), x, v, g)
    np.testing.assert_allclose(y, expected_y, rtol=1e-5, atol=1e-5)
    for name, got, want in zip(("x", "v", "g"), vjp(dy), expected_vjp(dy)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"gradient of {name}")


def test_batch_norm_uses_batch_statistics():
    x = 5.0 + 3.0 * jax.random.normal(jax.random.key(3), (32, 6))
    y = np.asarray(BatchNorm(6)(x))
    np.testing.assert_allclose(y.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.var(0), 1.0, atol=1e-3)  # biased variance, eps 1e-5
    x = jax.random.normal(jax.random.key(4), (6, 32))
    changed = x.at[5].set(10.0)
    with_bn = DINOHead(head_config(use_bn=True), rngs=nnx.Rngs(0))
    without_bn = DINOHead(head_config(use_bn=False), rngs=nnx.Rngs(0))
    assert not np.allclose(with_bn(x)[0], with_bn(changed)[0], atol=1e-4)
    np.testing.assert_allclose(without_bn(x)[0], without_bn(changed)[0], atol=1e-6)
    assert "bn.1.scale" in flat_params(with_bn) and not any(
        name.startswith("bn.") for name in flat_params(without_bn)
    )


def test_dino_wrapper_groups_and_param_paths():
    head = head_config()
    config = ViTConfig(image_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, drop_path_rate=0.5)
    model = DINO(config, head, rngs=nnx.Rngs(0))
    names = flat_params(model)
    for name in [
        "head.last_layer.weight_g",
        "head.last_layer.weight_v",
        "head.mlp.0.bias",
        "backbone.pos_embed",
        "backbone.cls_token",
        "backbone.patch_embed.kernel",
        "backbone.blocks.1.attn.qkv.kernel",
        "backbone.norm.scale",
    ]:
        assert name in names
    globals_ = images(8, batch=4)
    locals_ = images(9, batch=6, size=8)
    logits = features(model, [globals_, locals_])
    assert logits.shape == (10, 64)
    expected = model.head(
        jnp.concatenate([features(model.backbone, globals_), features(model.backbone, locals_)])
    )
    np.testing.assert_allclose(logits, expected, atol=1e-6)
    # Two groups of identical crops get different drop-path masks.
    twice = features(model, [globals_, globals_], jax.random.key(0))
    assert not np.allclose(twice[:4], twice[4:], atol=1e-5)
    with pytest.raises(ValueError, match="does not match the backbone's embed_dim 32"):
        DINO(config, head_config(in_dim=16), rngs=nnx.Rngs(0))


def test_token_layout_keeps_each_devices_rows_together_and_split_inverts_join():
    # Two groups over 2 devices: 4 images of 3 tokens and 8 images of 1 token.
    layout = TokenLayout((GroupLayout(4, 3, 3), GroupLayout(8, 1, 1)), shards=2)
    first = jnp.arange(12.0).reshape(12, 1)  # group 0's rows, images 0-1 on device 0, 2-3 on 1
    second = 100 + jnp.arange(8.0).reshape(8, 1)
    rows = np.asarray(layout.join([first, second]))[:, 0]
    # Device 0's half: its 6 rows of group 0, then its 4 of group 1; then device 1's.
    np.testing.assert_array_equal(
        rows, [0, 1, 2, 3, 4, 5, 100, 101, 102, 103, 6, 7, 8, 9, 10, 11, 104, 105, 106, 107]
    )
    split = layout.split(jnp.asarray(rows)[:, None])
    np.testing.assert_array_equal(np.asarray(split[0]).ravel(), np.arange(12.0))
    np.testing.assert_array_equal(np.asarray(split[1]).ravel(), 100 + np.arange(8.0))
    assert split[0].shape == (4, 3, 1) and split[1].shape == (8, 1, 1)
    with pytest.raises(ValueError, match="do not split over 3 devices"):
        TokenLayout((GroupLayout(4, 3, 3),), shards=3)


def test_features_of_a_batch_split_over_devices_are_those_of_one_device():
    config = ViTConfig(image_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    model = VisionTransformer(config, rngs=nnx.Rngs(0))
    groups = [images(1, batch=4), images(2, batch=8, size=8)]
    one = model.forward_groups(groups)
    two = model.forward_groups(groups, shards=2)
    for a, b in zip(one, two):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shards", [1, 2])
def test_joint_token_rows_and_group_after_group_give_the_same_features_and_gradients(shards):
    # The CPU runs the groups one after another, GPUs and TPUs as one matrix of rows
    # (vit.forward_groups): the same arithmetic per token, the same stochastic depth per image.
    config = ViTConfig(image_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2, drop_path_rate=0.5)
    model = VisionTransformer(config, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    groups = [images(1, batch=4), images(2, batch=8, size=8)]
    weights = [jax.random.normal(jax.random.key(3 + i), (g.shape[0], 32)) for i, g in enumerate(groups)]

    def loss(params, joint_rows):
        tokens = [nnx.merge(graphdef, params).prepare_tokens(g) for g in groups]
        features = nnx.merge(graphdef, params)._features(
            *tokens, fused_attention=False, joint_rows=joint_rows, drop_path_rng=jax.random.key(7), shards=shards
        )
        return sum(jnp.sum(f * w) for f, w in zip(features, weights)), features

    grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (joint_loss, joint_features), joint_grads = grad(params, True)
    (split_loss, split_features), split_grads = grad(params, False)
    assert float(split_loss) == pytest.approx(float(joint_loss), rel=1e-6)
    for a, b in zip(joint_features, split_features):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
    for (path, a), (_, b) in zip(nnx.to_flat_state(joint_grads), nnx.to_flat_state(split_grads)):
        a, b = np.asarray(a[...]), np.asarray(b[...])
        assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max(), path
    # Stochastic depth dropped some images' branches (rate 0.5 at the last block): not all kept.
    kept = block_lib.draw_drop_path_masks(jax.random.key(7), model.drop_path_rates, 12)
    assert not bool(kept.all())
