"""The errors a user can cause and fix (bad config, missing data, bad or foreign checkpoint,
unreadable image, diverged run, missing file).

launch.py prints these as one clear message instead of a traceback; anything else is a bug and
keeps its traceback.
"""

from dino_jax.checkpointing import CheckpointError
from dino_jax.config import ConfigError
from dino_jax.data.image_files import ImageFileError
from dino_jax.data.sources import DatasetUnavailableError
from dino_jax.interop.torch_io import CheckpointFormatError
from dino_jax.logging import NonFiniteLossError

USER_ERRORS = (
    ConfigError,
    DatasetUnavailableError,
    CheckpointError,
    CheckpointFormatError,
    ImageFileError,
    NonFiniteLossError,
    FileNotFoundError,
)
