"""Numbers the reference fixes, pinned where a wrong one would otherwise pass: each value is written
out here (not read from the config or a dataclass default the code also reads), and checked where it
acts (the crops each group gets, the applied step of `training_parts.build_training`), at values other than
the ones where a mix-up cancels (rate 0.5, batch 256, warm-up equal to the final temperature)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dino_jax import config as config_lib
from dino_jax import sharding
from dino_jax.configs import base
from dino_jax.data import normalize
from dino_jax.data.multicrop import spec
from dino_jax.models import block
from dino_jax.models.block import GroupLayout, TokenLayout
from dino_jax.train_step import crop_major
from tests import train_helpers as th
from tests.test_losses import reference_loss

pytestmark = pytest.mark.usefixtures("fast_compilation")


def test_default_multicrop_recipe_is_the_references_crop_by_crop():
    crops = config_lib.crop_config(base.get_config())
    assert (crops.global_size, crops.local_size, crops.num_local_crops) == (224, 96, 8)
    assert crops.global_scale == (0.4, 1.0) and crops.local_scale == (0.05, 0.4)
    assert crops.aspect_ratio == pytest.approx((3 / 4, 4 / 3), rel=1e-12)
    assert (crops.flip_p, crops.color_jitter_p, crops.grayscale_p) == (0.5, 0.8, 0.2)
    assert (crops.brightness, crops.contrast, crops.saturation, crops.hue) == (0.4, 0.4, 0.2, 0.1)
    assert crops.blur_sigma == (0.1, 2.0)
    # Per crop, in the reference's order [global 1, global 2, 8 locals]: blur always / rarely /
    # half the time; solarisation on the second global crop only.
    global_group, local_group = spec.crop_groups(crops)
    assert (global_group.size, global_group.scale, local_group.size, local_group.scale) == (
        224,
        (0.4, 1.0),
        96,
        (0.05, 0.4),
    )
    blur = np.concatenate([global_group.blur_p, local_group.blur_p])
    solarize = np.concatenate([global_group.solarize_p, local_group.solarize_p])
    assert blur.tolist() == [1.0, 0.1] + [0.5] * 8
    assert solarize.tolist() == [0.0, 0.2] + [0.0] * 8


def normalized_crops(config, batch):
    mean, std = config.dataset.mean, config.dataset.std
    return [
        normalize.normalize_images(crop_major(jnp.asarray(batch[name])), mean, std)
        for name in ("global_crops", "local_crops")
    ]


@pytest.fixture(scope="module")
def one_step():
    """`run(step) -> (state after, metrics)`: the jitted training step of a config whose values are
    none of the defaults, from its initial state moved to `step`, with a random center; plus the
    inputs: the center, the batch's logits (student: all crops, teacher: the global ones)."""
    config = th.tiny_config(
        **{
            "train.lr": 2e-3,  # batch 16, no warm-up: a peak of 2e-3 * 16 / 256
            "train.center_momentum": 0.8,
            "train.epochs": 4,  # two steps an epoch; the temperature warms up over epochs 0-2:
            "train.max_steps": 0,
            "train.warmup_teacher_temp": 0.02,  # linspace(0.02, 0.06, 3), then 0.06
            "train.teacher_temp": 0.06,
            "train.warmup_teacher_temp_epochs": 3,
        }
    )
    parts, mesh = th.build(config, num_train_examples=2 * config.train.batch_size)
    center = np.random.default_rng(0).normal(size=(1, config.head.out_dim)).astype(np.float32)
    initial = parts.state.replace(center=jax.device_put(center, parts.state.center.sharding))
    batch = th.fixed_batch(config)
    crops = normalized_crops(config, batch)
    apply = jax.jit(lambda params, crops: nnx.merge(parts.graphdef, params)(crops))
    logits = {  # no drop path in this recipe, so the student's are the step's too
        "student": np.asarray(apply(initial.student, crops), np.float64),
        "teacher": np.asarray(apply(initial.teacher, crops[:1]), np.float64),
    }

    def run(step):
        # The step donates its input state: hand it a copy.
        state = jax.tree.map(lambda x: jax.device_put(jnp.copy(x), x.sharding), initial)
        state = state.replace(step=jax.device_put(jnp.asarray(step, jnp.int32), initial.step.sharding))
        return parts.step_fn(state, sharding.to_global_batch(batch, mesh))

    return config, initial, center, logits, run


def test_center_is_the_ema_of_the_teacher_batch_mean_at_the_configured_momentum(one_step):
    _, _, center, logits, run = one_step
    state, _ = run(0)
    expected = 0.8 * center + 0.2 * logits["teacher"].mean(axis=0, keepdims=True)
    np.testing.assert_allclose(np.asarray(state.center), expected, rtol=1e-5, atol=1e-6)


def test_teacher_temperature_warms_up_per_epoch_from_its_own_start_to_its_own_end(one_step):
    config, _, center, logits, run = one_step
    for step, temperature in ((1, 0.02), (2, 0.04), (6, 0.06)):  # epochs 0, 1 and 3
        _, metrics = run(step)
        assert float(metrics["teacher_temperature"]) == pytest.approx(temperature, rel=1e-6), step
        expected, _ = reference_loss(
            logits["student"], logits["teacher"], center, 2 + config.augment.num_local_crops, temperature
        )
        assert float(metrics["loss"]) == pytest.approx(expected, rel=2e-5), f"loss at step {step}"


def test_the_applied_learning_rate_is_scaled_by_the_batch_over_256(one_step):
    _, initial, _, _, run = one_step
    peak = 2e-3 * 16 / 256

    def fc1_bias(params):
        return np.asarray(params["backbone"]["blocks"]["mlp"]["fc1"]["bias"].get_value()[0])

    state, metrics = run(0)
    assert float(metrics["lr"]) == pytest.approx(peak, rel=1e-6)
    # AdamW's first step moves each entry by lr * g / (|g| + eps), i.e. by the rate itself (a bias:
    # no weight decay).
    assert np.median(np.abs(fc1_bias(state.student) - fc1_bias(initial.student))) == pytest.approx(
        peak, rel=1e-3
    )


def test_drop_path_keeps_an_image_with_probability_one_minus_its_blocks_rate():
    rates = [0.0, 0.2, 0.5]
    masks = np.asarray(block.draw_drop_path_masks(jax.random.key(0), rates, 20000))
    assert masks.shape == (3, 2, 20000)
    assert masks[0].all()  # rate 0 keeps every image
    for index, rate in enumerate(rates[1:], start=1):
        for branch in (0, 1):
            assert masks[index, branch].mean() == pytest.approx(1 - rate, abs=0.012)  # 3.5 standard errors
    # The two branches of a block, and two blocks, draw independently.
    both = (~masks[2, 0] & ~masks[2, 1]).mean()
    assert both == pytest.approx(0.25, abs=0.011)
    x = jnp.ones((20000, 1))
    layout = TokenLayout((GroupLayout(batch=20000, tokens=1, valid=1),))
    out = np.asarray(block.drop_path_rows(x, layout, 0.2, jnp.asarray(masks[1, 0])))[:, 0]
    kept = out != 0
    np.testing.assert_array_equal(kept, masks[1, 0])
    np.testing.assert_allclose(out[kept], 1 / 0.8, rtol=1e-6)
