"""Tests of feature extraction from a tiny ViT: feature kinds, padding, sharding over 2 devices."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest


pytestmark = pytest.mark.usefixtures("fast_compilation")


def _tiny_vit():
    from flax import nnx
    from dino_jax.models.vit import ViTConfig, VisionTransformer

    config = ViTConfig(image_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2)
    return VisionTransformer(config, rngs=nnx.Rngs(0))


def _padded_batches(images, labels, batch_size):
    for start in range(0, len(images), batch_size):
        image, label = images[start : start + batch_size], labels[start : start + batch_size]
        pad = batch_size - len(image)
        yield {
            "image": np.pad(image, ((0, pad), (0, 0), (0, 0), (0, 0))),
            "label": np.pad(label, (0, pad)),
            "mask": np.arange(batch_size) < len(image),
        }


def test_features_match_direct_model_calls():
    from flax import nnx
    from dino_jax.data.normalize import normalize_images
    from dino_jax.eval.features import extract_features, make_feature_fn

    model = _tiny_vit()
    graphdef, params = nnx.split(model)
    images = np.random.default_rng(7).integers(0, 256, (10, 16, 16, 3), dtype=np.uint8)
    labels = np.arange(10) % 3
    pixels = normalize_images(images)
    blocks = model.intermediate_layers(pixels, 2)
    expected = {
        (1, False): np.asarray(model(pixels)),
        (2, False): np.concatenate([np.asarray(b[:, 0]) for b in blocks], axis=1),
        # The reference's interleaving: cls_0, avg_0, cls_1, avg_1, ...
        (1, True): np.stack([blocks[-1][:, 0], blocks[-1][:, 1:].mean(axis=1)], -1).reshape(10, -1),
    }
    for (n_last_blocks, avgpool), want in expected.items():
        feature_fn = make_feature_fn(graphdef, n_last_blocks=n_last_blocks, avgpool=avgpool)
        features, got_labels = extract_features(feature_fn, params, _padded_batches(images, labels, 4))
        np.testing.assert_allclose(features, want, atol=1e-5)
        np.testing.assert_array_equal(got_labels, labels)


def test_avgpool_needs_one_block():
    from flax import nnx
    from dino_jax.eval.features import make_feature_fn

    graphdef, _ = nnx.split(_tiny_vit())
    with pytest.raises(ValueError, match="n_last_blocks=1"):
        make_feature_fn(graphdef, n_last_blocks=4, avgpool=True)


def test_extraction_shards_over_two_devices():
    # A fresh process: the device count is fixed when jax starts.
    script = textwrap.dedent("""
      import jax, numpy as np
      from flax import nnx
      from dino_jax.models.vit import ViTConfig, VisionTransformer
      from dino_jax.data.normalize import normalize_images
      from dino_jax.eval.features import extract_features, make_feature_fn
      assert jax.device_count() == 2
      model = VisionTransformer(ViTConfig(image_size=8, patch_size=4, embed_dim=8, depth=1,
                                          num_heads=2), rngs=nnx.Rngs(0))
      graphdef, params = nnx.split(model)
      images = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
      batches = [{"image": images[:4], "label": np.arange(4), "mask": np.ones(4, bool)},
                 {"image": np.concatenate([images[4:], images[:2]]), "label": np.arange(4, 8),
                  "mask": np.arange(4) < 2}]
      features, labels = extract_features(make_feature_fn(graphdef), params, batches)
      np.testing.assert_allclose(features, np.asarray(model(normalize_images(images))), atol=1e-5)
      assert labels.tolist() == list(range(6))
      print("ok")
  """)
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_PLATFORMS="cpu",
        JAX_DISABLE_MOST_OPTIMIZATIONS="1",
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")


def test_equal_feature_functions_share_one_compilation():
    from flax import nnx
    from dino_jax.eval import features

    graphdef, params = nnx.split(_tiny_vit())
    images = np.zeros((2, 16, 16, 3), np.uint8)
    before = features._features._cache_size()
    for _ in range(2):  # e.g. the main data set, then a transfer set
        features.make_feature_fn(graphdef, mean=[0.5, 0.5, 0.5], std=(0.2,) * 3)(params, images)
    assert features._features._cache_size() == before + 1
