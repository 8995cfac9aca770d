"""dino_jax command line.

    python launch.py --config=configs/cifar100.py --workdir=runs/cifar100           # train + evaluate
    python launch.py --config=configs/digits.py --workdir=runs/d --config.train.epochs=5
"""

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (file.py or file.py:arg).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
_MODE = flags.DEFINE_enum("mode", "train", ["train"], "What to do.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from dino_jax import train

    if _MODE.value == "train":
        train.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
