"""The recipe (dino_jax/data/multicrop/spec.py): crop boxes against torchvision's sampler."""

import math
import random

import numpy as np

from dino_jax.data.multicrop import pil_reference, spec


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
