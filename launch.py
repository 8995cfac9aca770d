"""dino_jax command line: a thin shell over `dino_jax.train`.

    python launch.py --config=configs/cifar100.py --workdir=runs/cifar100           # train + evaluate
    python launch.py --config=configs/digits.py --workdir=runs/d --config.train.epochs=5
"""

import os
import sys

# TensorFlow (used only to prepare datasets) and orbax/TFDS INFO lines would drown the progress line.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Recipe file, optionally with an argument: configs/cifar100.py[:smoke].", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
_MODE = flags.DEFINE_enum("mode", "train", ["train"], "train: train, then evaluate.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    from dino_jax import config as config_lib

    try:
        # Checked before anything is read or compiled, so a typo costs nothing.
        config_lib.validate(_CONFIG.value)
    except config_lib.ConfigError as error:
        sys.exit(f"error: {error}")

    from dino_jax import errors, train

    try:
        if _MODE.value == "train":
            train.run(_CONFIG.value, _WORKDIR.value)
    except errors.USER_ERRORS as error:
        sys.exit(f"error: {error}")


def parse_flags(argv):
    """absl's parser, with a wrong `--config.x` key reported as one line instead of a traceback."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        sys.exit(f"error: {error}\nPass --helpfull to see the flags.")
    except (AttributeError, KeyError) as error:
        message = str(error).strip("'\"").replace("\\n", " ").replace("\\'", "'")
        sys.exit(f"error: unknown config key in the --config.* overrides: {message}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=parse_flags)
