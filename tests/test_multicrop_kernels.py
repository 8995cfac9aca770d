"""PIL-exact kernels (dino_jax/data/multicrop/: resize.py, color.py, box_blur.py) against PIL, op by op."""

import colorsys

import numpy as np
import pytest
from PIL import Image, ImageFilter

from dino_jax.data.multicrop import box_blur, color, pil_reference, resize, spec


def _smooth_image(seed, size=40):
    """A natural-ish colour image: smoothed noise, so hue and blur have something to act on."""
    noise = np.random.RandomState(seed).randint(0, 256, (size, size, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(noise).filter(ImageFilter.SMOOTH_MORE))


def _planar(image):
    return np.ascontiguousarray(image.transpose(2, 0, 1), np.float32)[None]


def _hwc(planar):
    return planar[0].transpose(1, 2, 0).astype(np.int64)


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
    ours = _hwc(resize.resized_crops(_planar(image), np.array([0]), np.array([box]), np.array([flip]), size))
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
    ours = _hwc(color.color_jitter(_planar(image), np.array([True]), np.array([order]), np.array([factors])))
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
        color.color_jitter(
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
    kept = color.color_jitter(x.copy(), np.array([True]), order, np.array([[1.0, 1.0, 1.0, 0.0]]))
    np.testing.assert_array_equal(kept, x)
    skipped = color.color_jitter(x.copy(), np.array([False]), order, np.array([[0.6, 1.4, 0.8, 0.1]]))
    np.testing.assert_array_equal(skipped, x)


def test_grayscale_matches_pil():
    image = _smooth_image(5)
    ours = color.luma(_planar(image))[0].astype(np.int64)
    ref = np.asarray(Image.fromarray(image).convert("L"), np.int64)
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("sigma", [0.1, 0.6, 1.3, 2.0])
def test_blur_matches_pil_gaussian_blur(sigma):
    image = _smooth_image(6, 32)
    ours = _hwc(box_blur.gaussian_blur(_planar(image), np.array([sigma])))
    ref = np.asarray(pil_reference.gaussian_blur(Image.fromarray(image), sigma), np.int64)
    # Pillow rounds to 8 bits after each of its 6 box passes, we once at the end: unbiased noise
    # of about one level (measured: mean |diff| 0.2-0.6, max 3 at sigma 0.1, max 1 from 1.3 up).
    diff = ours - ref
    assert abs(diff.mean()) < 0.05 and np.abs(diff).mean() < 0.7 and np.abs(diff).max() <= 3
