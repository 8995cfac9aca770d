"""The errors a user can cause and fix (bad config or recipe argument, missing data, bad or foreign
checkpoint, unreadable or too small image, episodes the data cannot fill, diverged run, a path that
is missing or cannot be written).

launch.py prints these as one clear message instead of a traceback; anything else is a bug and
keeps its traceback.

`ConfigError` is defined here because the config schema (`configs/base.py`) and `config.py` both
raise it and neither should import the other for it. This module sits below every other one: it
imports nothing from the package at import time, and `user_errors` gathers the error types that
live beside their code only when a caller asks for them.
"""


class ConfigError(ValueError):
    """A config value is wrong; the message names every bad key."""


def user_errors() -> tuple[type[Exception], ...]:
    """Every error type a user can fix, for an `except` clause that prints them as one line."""
    # Imported here, not above: these modules pull in JAX and orbax, and the config schema
    # imports this module for ConfigError.
    from dino_jax.checkpointing import CheckpointError
    from dino_jax.data.image_files import ImageFileError
    from dino_jax.data.sources import DatasetUnavailableError
    from dino_jax.eval.fewshot import EpisodeError
    from dino_jax.hooks.guards import NonFiniteLossError
    from dino_jax.interop.torch_io import CheckpointFormatError

    return (
        ConfigError,
        DatasetUnavailableError,
        CheckpointError,
        CheckpointFormatError,
        ImageFileError,
        EpisodeError,
        NonFiniteLossError,
        FileNotFoundError,
        PermissionError,
        IsADirectoryError,
        NotADirectoryError,
    )
