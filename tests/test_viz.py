"""Tests of the attention maps, threshold masks and figures."""

import os

import numpy as np
import pytest

from dino_jax.viz import attention as viz


pytestmark = pytest.mark.usefixtures("fast_compilation")


def _reference_masks_torch(attention_HxP, threshold):
    """The reference's mask steps, written with torch: sort, renormalise, cumsum, unsort."""
    torch = pytest.importorskip("torch")
    values, order = torch.sort(torch.as_tensor(attention_HxP))
    values = values / values.sum(dim=1, keepdim=True)
    kept_sorted = torch.cumsum(values, dim=1) > (1 - threshold)
    restore = torch.argsort(order)
    return torch.stack([kept_sorted[h][restore[h]] for h in range(len(kept_sorted))]).numpy()


@pytest.mark.parametrize("threshold", [0.1, 0.6, 0.9])
def test_masks_keep_the_threshold_mass_and_no_more_than_needed(threshold):
    rng = np.random.default_rng(0)
    attention = rng.dirichlet(np.full(64, 0.3), size=(2, 3)).reshape(2, 3, 8, 8)
    masks = viz.threshold_masks(attention, threshold)
    assert masks.shape == attention.shape and masks.dtype == bool
    kept = (attention * masks).sum(axis=(-2, -1))
    assert np.all(kept >= threshold - 1e-12)
    # Minimal: dropping the weakest kept patch falls below the threshold.
    weakest = np.where(masks, attention, np.inf).min(axis=(-2, -1))
    assert np.all(kept - weakest < threshold)
    np.testing.assert_array_equal(
        masks.reshape(6, 64), _reference_masks_torch(attention.reshape(6, 64), threshold)
    )


def test_masks_work_on_flat_maps_and_reject_bad_thresholds():
    masks = viz.threshold_masks(np.array([0.1, 0.5, 0.25, 0.15]), 0.6)
    np.testing.assert_array_equal(masks, [False, True, True, False])
    with pytest.raises(ValueError, match="threshold=1.5"):
        viz.threshold_masks(np.ones(4), 1.5)


def test_upsample_repeats_each_patch():
    maps = np.arange(6).reshape(1, 2, 3)
    up = viz.upsample_nearest(maps, 4)
    assert up.shape == (1, 8, 12)
    assert np.all(up[0, 4:8, 8:12] == 5)


def test_crop_to_patch_multiple():
    assert viz.crop_to_patch_multiple(np.zeros((37, 50, 3)), 8).shape == (32, 48, 3)
    with pytest.raises(ValueError, match="smaller than one 8-pixel patch"):
        viz.crop_to_patch_multiple(np.zeros((5, 50, 3)), 8)


@pytest.fixture(scope="module")
def tiny_model():
    from flax import nnx
    from dino_jax.models.vit import ViTConfig, VisionTransformer

    model = VisionTransformer(
        ViTConfig(image_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2), rngs=nnx.Rngs(0)
    )
    return model, nnx.split(model)


def test_attention_rows_sum_to_one(tiny_model):
    from dino_jax.data.normalize import normalize_images

    model, (graphdef, params) = tiny_model
    images = np.random.default_rng(1).integers(0, 256, (2, 16, 24, 3), dtype=np.uint8)
    attention = np.asarray(model.last_self_attention(normalize_images(images)))
    assert attention.shape == (2, 2, 1 + 4 * 6, 1 + 4 * 6)
    np.testing.assert_allclose(attention.sum(-1), 1.0, atol=1e-5)
    cls_maps = np.asarray(viz.make_cls_attention_fn(graphdef, patch_size=4)(params, images))
    assert cls_maps.shape == (2, 2, 4, 6)
    np.testing.assert_allclose(cls_maps.sum((-2, -1)) + attention[:, :, 0, 0], 1.0, atol=1e-5)


def test_visualize_files_writes_maps_masks_overlays_and_grid(tiny_model, tmp_path):
    from PIL import Image

    _, (graphdef, params) = tiny_model
    rng = np.random.default_rng(2)
    paths = []
    for name, size in (("cat.png", (30, 21)), ("dog.jpg", (16, 16))):
        path = tmp_path / name
        Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(path)
        paths.append(str(path))
    written = viz.visualize_files(
        viz.make_cls_attention_fn(graphdef, patch_size=4), params, paths, str(tmp_path / "out"), patch_size=4
    )
    cat = {os.path.basename(p) for p in written[paths[0]]}
    assert {
        "img.png",
        "attn-head0.png",
        "attn-head1.png",
        "attn-mean.png",
        "overlay-mean.png",
        "mask_th0.6_head0.png",
        "mask_th0.6_head1.png",
        "mask_th0.6_mean.png",
    } <= cat
    for path in written[paths[0]] + written[paths[1]] + written["grid"]:
        assert os.path.getsize(path) > 0
    # The attention map is the cropped image's size: 30x21 -> 28x20 pixels.
    assert np.asarray(Image.open(tmp_path / "out" / "cat" / "attn-head0.png")).shape[:2] == (28, 20)


def test_grid_figure_renders_to_an_array():
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)] * 2
    maps = [rng.dirichlet(np.ones(16), size=3).reshape(3, 4, 4)] * 2
    pixels = viz.figure_to_array(viz.attention_grid_figure(images, maps, patch_size=4))
    assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3


def test_attention_panel_for_training_logs(tiny_model):
    _, (graphdef, params) = tiny_model
    images = np.random.default_rng(4).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    panel = viz.attention_panel(
        viz.make_cls_attention_fn(graphdef, patch_size=4), params, images, patch_size=4
    )
    assert panel.dtype == np.uint8 and panel.shape[2] == 3 and panel.shape[0] > panel.shape[1] / 4
