"""Typed specs built from the config schema's defaults (dino_jax/configs/base.py), the one place
that holds them, with the fields a test needs changed."""

import dataclasses

from dino_jax import config as config_lib
from dino_jax.configs import base


def reference_crops(global_size, local_size, num_local_crops, **fields):
    """The reference's multi-crop recipe at these crop sizes, with `fields` replaced."""
    return dataclasses.replace(
        config_lib.crop_config(base.get_config()),
        global_size=global_size,
        local_size=local_size,
        num_local_crops=num_local_crops,
        **fields,
    )


def suite_settings(**fields):
    """The default evaluation protocol, with `fields` replaced."""
    return dataclasses.replace(config_lib.suite_settings(base.get_config()), **fields)
