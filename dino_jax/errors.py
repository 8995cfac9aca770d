"""The errors a user can cause and fix (bad config or recipe argument, missing data, bad or foreign
checkpoint, unreadable or too small image, episodes the data cannot fill, diverged run, a path that
is missing or cannot be written).

launch.py prints these as one clear message instead of a traceback; anything else is a bug and
keeps its traceback.
"""

from dino_jax.checkpointing import CheckpointError
from dino_jax.config import ConfigError
from dino_jax.data.image_files import ImageFileError
from dino_jax.data.sources import DatasetUnavailableError
from dino_jax.eval.fewshot import EpisodeError
from dino_jax.hooks import NonFiniteLossError
from dino_jax.interop.torch_io import CheckpointFormatError

USER_ERRORS = (
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
