"""Host multi-crop (dino_jax/data/multicrop/host.py): shapes, determinism, solarize vs PIL, op rates."""

import numpy as np
import pytest
from PIL import Image, ImageFilter

from dino_jax.data.multicrop import host, pil_reference, spec
from tests.config_helpers import reference_crops

CONFIG = reference_crops(global_size=32, local_size=16, num_local_crops=6)
# Everything off, so a single op's effect can be read off the output.
QUIET = dict(
    flip_p=0.0, color_jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0, 0.0), solarize_p=(0.0, 0.0, 0.0)
)


def _smooth_image(seed, size=40):
    """A natural-ish colour image: smoothed noise, so hue and blur have something to act on."""
    noise = np.random.RandomState(seed).randint(0, 256, (size, size, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(noise).filter(ImageFilter.SMOOTH_MORE))


# ----------------------------------------------------------------------------- contract


def test_shapes_dtypes_and_determinism():
    image = _smooth_image(0, 32)
    globals_a, locals_a = host.multicrop(image, np.random.default_rng(7), CONFIG)
    assert globals_a.shape == (2, 32, 32, 3) and globals_a.dtype == np.uint8
    assert locals_a.shape == (6, 16, 16, 3) and locals_a.dtype == np.uint8
    globals_b, locals_b = host.multicrop(image, np.random.default_rng(7), CONFIG)
    np.testing.assert_array_equal(globals_a, globals_b)
    np.testing.assert_array_equal(locals_a, locals_b)
    globals_c, _ = host.multicrop(image, np.random.default_rng(8), CONFIG)
    assert not np.array_equal(globals_a, globals_c)


def test_batch_equals_one_image_at_a_time():
    images = np.stack([_smooth_image(s, 32) for s in range(5)])
    batch_globals, batch_locals = host.multicrop_batch(
        images, [np.random.default_rng(s) for s in range(5)], CONFIG
    )
    for s in range(5):
        one_globals, one_locals = host.multicrop(images[s], np.random.default_rng(s), CONFIG)
        np.testing.assert_array_equal(batch_globals[s], one_globals)
        np.testing.assert_array_equal(batch_locals[s], one_locals)


def test_zero_local_crops_and_bad_inputs():
    config = reference_crops(global_size=16, local_size=8, num_local_crops=0)
    globals_, locals_ = host.multicrop(_smooth_image(1, 20), np.random.default_rng(0), config)
    assert globals_.shape == (2, 16, 16, 3) and locals_.shape == (0, 8, 8, 3)
    with pytest.raises(ValueError, match="uint8"):
        host.multicrop(np.zeros((8, 8, 3), np.float32), np.random.default_rng(0), config)
    with pytest.raises(ValueError, match="global_scale"):
        reference_crops(32, 16, 2, global_scale=(0.9, 0.4))
    with pytest.raises(ValueError, match="blur_p"):
        reference_crops(32, 16, 2, blur_p=(1.0, 0.1))


# ----------------------------------------------------------------------------- ops vs PIL


def test_solarize_matches_pil():
    ramp = np.tile(np.arange(256, dtype=np.uint8)[None, :, None], (2, 1, 3))
    # A full-size crop at the same size is an identity resize, so the output is the op alone.
    config = reference_crops(
        256,
        8,
        0,
        **{**QUIET, "solarize_p": (1.0, 1.0, 0.0), "global_scale": (1.0, 1.0), "aspect_ratio": (1.0, 1.0)},
    )
    square = np.tile(ramp[:1], (256, 1, 1))
    globals_, _ = host.multicrop(square, np.random.default_rng(0), config)
    ref = np.asarray(pil_reference.solarize(Image.fromarray(square)))
    np.testing.assert_array_equal(globals_[0], ref)
    np.testing.assert_array_equal(globals_[1], ref)


# ----------------------------------------------------------------------------- op rates

NUM_IMAGES = 2000
# A rate over 2000 images (x crops) has a standard error of at most 0.011; 0.035 is > 3 sigma.
RATE_TOLERANCE = 0.035


def _run_many(image, config, seed=0):
    images = np.repeat(image[None], NUM_IMAGES, axis=0)
    uniforms = np.random.default_rng(seed).random((NUM_IMAGES, 2 + config.num_local_crops, spec.NUM_UNIFORMS))
    return host.multicrop_from_uniforms(images, uniforms, config)


def test_solarize_fires_only_on_global_two_at_rate_0_2():
    config = reference_crops(16, 8, 4, **{**QUIET, "solarize_p": (0.0, 0.2, 0.0)})
    globals_, locals_ = _run_many(np.full((16, 16, 3), 200, np.uint8), config)
    solarized = lambda crops: (crops == 55).all(axis=(-3, -2, -1))
    assert not solarized(globals_[:, 0]).any()
    assert abs(solarized(globals_[:, 1]).mean() - 0.2) < RATE_TOLERANCE
    assert not solarized(locals_).any()
    assert ((globals_ == 200) | (globals_ == 55)).all()


def test_grayscale_rate_0_2_on_every_crop():
    config = reference_crops(16, 8, 4, **{**QUIET, "grayscale_p": 0.2})
    globals_, locals_ = _run_many(np.tile(np.array([200, 50, 120], np.uint8), (16, 16, 1)), config)
    for crops in (globals_[:, 0], globals_[:, 1], locals_):
        gray = (crops[..., 0] == crops[..., 1]).all(axis=(-2, -1))
        assert abs(gray.mean() - 0.2) < RATE_TOLERANCE


def test_flip_rate_0_5():
    config = reference_crops(16, 8, 4, **{**QUIET, "flip_p": 0.5})
    gradient = np.tile(np.linspace(0, 255, 16).astype(np.uint8)[None, :, None], (16, 1, 3))
    globals_, locals_ = _run_many(gradient, config)
    for crops in (globals_, locals_):
        rows = crops[..., 0].astype(int)
        flipped = rows[..., 0] > rows[..., -1]
        assert abs(flipped.mean() - 0.5) < RATE_TOLERANCE


def test_blur_rates_1_0_0_1_0_5():
    # Sigma drawn from (1.5, 2) so every blur is visible on 2-pixel stripes.
    config = reference_crops(
        16,
        8,
        4,
        **{
            **QUIET,
            "blur_p": (1.0, 0.1, 0.5),
            "blur_sigma": (1.5, 2.0),
            "global_scale": (1.0, 1.0),
            "local_scale": (0.25, 0.25),
        },
    )
    stripes = np.tile((np.arange(16) // 2 % 2 * 255).astype(np.uint8)[None, :, None], (16, 1, 3))
    globals_, locals_ = _run_many(stripes, config)
    contrast = lambda crops: crops.max(axis=(-3, -2, -1)).astype(int) - crops.min(axis=(-3, -2, -1))
    blurred = lambda crops: contrast(crops) < 200
    assert blurred(globals_[:, 0]).all()
    assert abs(blurred(globals_[:, 1]).mean() - 0.1) < RATE_TOLERANCE
    assert abs(blurred(locals_).mean() - 0.5) < RATE_TOLERANCE


def test_color_jitter_rate_0_8_and_factor_range():
    config = reference_crops(
        16, 8, 2, **{**QUIET, "color_jitter_p": 0.8, "contrast": 0.0, "saturation": 0.0, "hue": 0.0}
    )
    globals_, _ = _run_many(np.full((16, 16, 3), 100, np.uint8), config)
    values = globals_[:, :, 0, 0, 0].astype(int).ravel()
    # Brightness factor uniform in [0.6, 1.4], truncated: [60, 140]. Unchanged when f in [1, 1.01).
    assert values.min() >= 60 and values.max() <= 140
    changed = (values != 100).mean()
    assert abs(changed - 0.8 * (1 - 0.01 / 0.8)) < RATE_TOLERANCE
