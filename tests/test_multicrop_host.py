"""Host multi-crop (dino_jax/data/multicrop/host.py): shapes, determinism, PIL agreement, op rates."""

import colorsys
import math
import random

import numpy as np
import pytest
from PIL import Image, ImageFilter

from dino_jax.data.multicrop import host, pil_reference, spec

CONFIG = spec.MultiCropConfig(global_size=32, local_size=16, num_local_crops=6)
# Everything off, so a single op's effect can be read off the output.
QUIET = dict(
    flip_p=0.0, color_jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0, 0.0), solarize_p=(0.0, 0.0, 0.0)
)


def _smooth_image(seed, size=40):
    """A natural-ish colour image: smoothed noise, so hue and blur have something to act on."""
    noise = np.random.RandomState(seed).randint(0, 256, (size, size, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(noise).filter(ImageFilter.SMOOTH_MORE))


def _planar(image):
    return np.ascontiguousarray(image.transpose(2, 0, 1), np.float32)[None]


def _hwc(planar):
    return planar[0].transpose(1, 2, 0).astype(np.int64)


def _batch_with_uniforms(images, uniforms, config):
    return host.multicrop_from_uniforms(images, uniforms, config)


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
    config = spec.MultiCropConfig(global_size=16, local_size=8, num_local_crops=0)
    globals_, locals_ = host.multicrop(_smooth_image(1, 20), np.random.default_rng(0), config)
    assert globals_.shape == (2, 16, 16, 3) and locals_.shape == (0, 8, 8, 3)
    with pytest.raises(ValueError, match="uint8"):
        host.multicrop(np.zeros((8, 8, 3), np.float32), np.random.default_rng(0), config)
    with pytest.raises(ValueError, match="global_scale"):
        spec.MultiCropConfig(32, 16, 2, global_scale=(0.9, 0.4))
    with pytest.raises(ValueError, match="blur_p"):
        spec.MultiCropConfig(32, 16, 2, blur_p=(1.0, 0.1))


# ----------------------------------------------------------------------------- crop sampling


def test_crop_boxes_follow_torchvision_distribution():
    """Area fraction and log aspect ratio of our boxes vs the torchvision-style PIL sampler."""
    height = width = 32
    count = 4000
    uniforms = np.random.default_rng(0).random((count, spec.NUM_UNIFORMS))
    ours = spec.crop_boxes(uniforms, height, width, (0.05, 0.4), (3 / 4, 4 / 3))
    py_rng = random.Random(0)
    ref = np.array(
        [
            pil_reference.random_resized_crop_params(py_rng, height, width, (0.05, 0.4), (3 / 4, 4 / 3))
            for _ in range(count)
        ]
    )
    for boxes in (ours, ref):
        top, left, crop_h, crop_w = boxes.T
        assert (top >= 0).all() and (left >= 0).all()
        assert (top + crop_h <= height).all() and (left + crop_w <= width).all()
    area = lambda b: b[:, 2] * b[:, 3] / (height * width)
    log_aspect = lambda b: np.log(b[:, 3] / b[:, 2])
    # Rounding to whole pixels widens the ranges slightly; allow one pixel of slack each side.
    assert area(ours).min() >= 0.05 * 0.75 and area(ours).max() <= 0.4 * 1.25
    assert np.abs(log_aspect(ours)).max() <= math.log(4 / 3) + math.log(1 + 2 / 5)
    # Same distribution: deciles agree within 0.02 of area and 0.03 of log aspect (n=4000 each:
    # the sampling error of a decile is below 0.01).
    deciles = np.linspace(0.1, 0.9, 9)
    np.testing.assert_allclose(np.quantile(area(ours), deciles), np.quantile(area(ref), deciles), atol=0.02)
    np.testing.assert_allclose(
        np.quantile(log_aspect(ours), deciles), np.quantile(log_aspect(ref), deciles), atol=0.03
    )
    # Offsets uniform: the box centre's mean is the image centre (+-0.5 px, ~6 standard errors).
    assert abs((ours[:, 0] + ours[:, 2] / 2).mean() - height / 2) < 0.5


def test_crop_fallback_is_the_centre_crop():
    """When no attempt fits (scale > 1 never fits), torchvision takes the central crop."""
    uniforms = np.random.default_rng(0).random((3, spec.NUM_UNIFORMS))
    boxes = spec.crop_boxes(uniforms, 20, 40, (1.5, 2.0), (3 / 4, 4 / 3))
    # in_ratio 2 > 4/3: height kept, width = round(20 * 4/3) = 27, centred.
    np.testing.assert_array_equal(boxes, [[0, 6, 20, 27]] * 3)


# ----------------------------------------------------------------------------- ops vs PIL


@pytest.mark.parametrize(
    "box,flip,size",
    [
        ((3, 5, 20, 25), False, 16),
        ((0, 0, 40, 40), True, 16),
        ((10, 2, 30, 17), False, 32),
        ((4, 4, 9, 12), True, 32),
    ],
)
def test_resized_crop_matches_pil(box, flip, size):
    image = _smooth_image(1)
    ours = _hwc(host.resized_crops(_planar(image), np.array([0]), np.array([box]), np.array([flip]), size))
    ref = pil_reference.resized_crop(Image.fromarray(image), box, size)
    if flip:
        ref = ref.transpose(Image.FLIP_LEFT_RIGHT)
    # Pillow rounds in fixed point, we in float32: at most one level apart, almost always equal.
    diff = np.abs(ours - np.asarray(ref, np.int64))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


@pytest.mark.parametrize("op", [spec.BRIGHTNESS, spec.CONTRAST, spec.SATURATION])
@pytest.mark.parametrize("factor", [0.6, 0.93, 1.4])
def test_blend_ops_match_pil_exactly(op, factor):
    image = _smooth_image(2)
    factors = [1.0, 1.0, 1.0, 0.0]
    factors[op] = factor
    order = [op] + [o for o in range(4) if o != op]
    ours = _hwc(host.color_jitter(_planar(image), np.array([True]), np.array([order]), np.array([factors])))
    ref = np.asarray(pil_reference.color_jitter(Image.fromarray(image), [op], factors), np.int64)
    np.testing.assert_array_equal(ours, ref)


def _colorsys_hue(image, shift):
    out = np.empty(image.shape, np.float64)
    for index in np.ndindex(image.shape[:2]):
        h, s, v = colorsys.rgb_to_hsv(*(image[index] / 255.0))
        out[index] = colorsys.hsv_to_rgb((h + shift) % 1.0, s, v)
    return np.floor(out * 255.0 + 0.5)


@pytest.mark.parametrize("shift", [-0.1, 0.037, 0.1, 0.5])
def test_hue_matches_float_hsv_and_pil_within_its_quantisation(shift):
    image = _smooth_image(3, 24)
    factors = [1.0, 1.0, 1.0, shift]
    ours = _hwc(
        host.color_jitter(
            _planar(image), np.array([True]), np.array([[spec.HUE, 0, 1, 2]]), np.array([factors])
        )
    )
    # Exact float HSV (Python's colorsys): equal up to a rounding tie.
    assert np.abs(ours - _colorsys_hue(image, shift)).max() <= 1
    # PIL stores hue and saturation in 8 bits (a hue step moves a saturated channel by up to 6
    # levels): on average within a level, and never more than two hue steps apart. Checked over
    # the recipe's range (|shift| <= 0.1); at 0.5 PIL's shift of int(127.5) is half a step short.
    if abs(shift) > 0.1:
        return
    ref = np.asarray(pil_reference.color_jitter(Image.fromarray(image), [spec.HUE], factors), np.int64)
    diff = np.abs(ours - ref)
    assert diff.mean() < 1.0 and diff.max() <= 12


def test_zero_factors_are_identity_and_disabled_jitter_is_identity():
    image = _smooth_image(4)
    x = _planar(image)
    order = np.array([[3, 1, 0, 2]])
    kept = host.color_jitter(x.copy(), np.array([True]), order, np.array([[1.0, 1.0, 1.0, 0.0]]))
    np.testing.assert_array_equal(kept, x)
    skipped = host.color_jitter(x.copy(), np.array([False]), order, np.array([[0.6, 1.4, 0.8, 0.1]]))
    np.testing.assert_array_equal(skipped, x)


def test_grayscale_matches_pil():
    image = _smooth_image(5)
    ours = host.luma(_planar(image))[0].astype(np.int64)
    ref = np.asarray(Image.fromarray(image).convert("L"), np.int64)
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("sigma", [0.1, 0.6, 1.3, 2.0])
def test_blur_matches_pil_gaussian_blur(sigma):
    image = _smooth_image(6, 32)
    ours = _hwc(host.gaussian_blur(_planar(image), np.array([sigma])))
    ref = np.asarray(pil_reference.gaussian_blur(Image.fromarray(image), sigma), np.int64)
    # Pillow rounds to 8 bits after each of its 6 box passes, we once at the end: unbiased noise
    # of about one level (measured: mean |diff| 0.2-0.6, max 3 at sigma 0.1, max 1 from 1.3 up).
    diff = ours - ref
    assert abs(diff.mean()) < 0.05 and np.abs(diff).mean() < 0.7 and np.abs(diff).max() <= 3


def test_solarize_matches_pil():
    ramp = np.tile(np.arange(256, dtype=np.uint8)[None, :, None], (2, 1, 3))
    # A full-size crop at the same size is an identity resize, so the output is the op alone.
    config = spec.MultiCropConfig(
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
    config = spec.MultiCropConfig(16, 8, 4, **{**QUIET, "solarize_p": (0.0, 0.2, 0.0)})
    globals_, locals_ = _run_many(np.full((16, 16, 3), 200, np.uint8), config)
    solarized = lambda crops: (crops == 55).all(axis=(-3, -2, -1))
    assert not solarized(globals_[:, 0]).any()
    assert abs(solarized(globals_[:, 1]).mean() - 0.2) < RATE_TOLERANCE
    assert not solarized(locals_).any()
    assert ((globals_ == 200) | (globals_ == 55)).all()


def test_grayscale_rate_0_2_on_every_crop():
    config = spec.MultiCropConfig(16, 8, 4, **{**QUIET, "grayscale_p": 0.2})
    globals_, locals_ = _run_many(np.tile(np.array([200, 50, 120], np.uint8), (16, 16, 1)), config)
    for crops in (globals_[:, 0], globals_[:, 1], locals_):
        gray = (crops[..., 0] == crops[..., 1]).all(axis=(-2, -1))
        assert abs(gray.mean() - 0.2) < RATE_TOLERANCE


def test_flip_rate_0_5():
    config = spec.MultiCropConfig(16, 8, 4, **{**QUIET, "flip_p": 0.5})
    gradient = np.tile(np.linspace(0, 255, 16).astype(np.uint8)[None, :, None], (16, 1, 3))
    globals_, locals_ = _run_many(gradient, config)
    for crops in (globals_, locals_):
        rows = crops[..., 0].astype(int)
        flipped = rows[..., 0] > rows[..., -1]
        assert abs(flipped.mean() - 0.5) < RATE_TOLERANCE


def test_blur_rates_1_0_0_1_0_5():
    # Sigma drawn from (1.5, 2) so every blur is visible on 2-pixel stripes.
    config = spec.MultiCropConfig(
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
    config = spec.MultiCropConfig(
        16, 8, 2, **{**QUIET, "color_jitter_p": 0.8, "contrast": 0.0, "saturation": 0.0, "hue": 0.0}
    )
    globals_, _ = _run_many(np.full((16, 16, 3), 100, np.uint8), config)
    values = globals_[:, :, 0, 0, 0].astype(int).ravel()
    # Brightness factor uniform in [0.6, 1.4], truncated: [60, 140]. Unchanged when f in [1, 1.01).
    assert values.min() >= 60 and values.max() <= 140
    changed = (values != 100).mean()
    assert abs(changed - 0.8 * (1 - 0.01 / 0.8)) < RATE_TOLERANCE
