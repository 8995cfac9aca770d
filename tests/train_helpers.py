"""Shared by the train-step tests: a tiny config, fixed batches, and a one-call set-up."""

import jax
import numpy as np

from configs import digits
from dino_jax import config_validation, sharding, training_parts


def tiny_config(**overrides):
    """digits:smoke (32-d, 2 blocks, 256 prototypes, 2 local crops) in float32 compute whatever the
    machine (the tests' expected numbers are float32's; model.dtype=auto is the Trainer's to
    resolve), plus overrides like `{"train.freeze_last_layer": 1}`."""
    config = digits.get_config("smoke")
    config.model.dtype = "float32"
    for key, value in overrides.items():
        section, name = key.split(".")
        config[section][name] = value
    config_validation.validate(config)
    return config


def fixed_batch(config, batch_size=None, seed=0):
    rng = np.random.default_rng(seed)
    b = batch_size or config.train.batch_size
    g, l, n = config.augment.global_crop_size, config.augment.local_crop_size, config.augment.num_local_crops
    return {
        "global_crops": rng.integers(0, 256, (b, 2, g, g, 3), dtype=np.uint8),
        "local_crops": rng.integers(0, 256, (b, n, l, l, 3), dtype=np.uint8),
    }


def build(config, num_train_examples=64, devices=None):
    mesh = sharding.make_mesh(devices)
    return training_parts.build_training(config, num_train_examples, mesh), mesh


def run_steps(parts, mesh, batches):
    state, history = parts.state, []
    for batch in batches:
        state, metrics = parts.step_fn(state, sharding.to_global_batch(batch, mesh))
        history.append({k: float(v) for k, v in jax.device_get(metrics).items()})
    return state, history
