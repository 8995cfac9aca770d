"""dino_jax command line: a thin shell over the library.

python launch.py --config=configs/cifar100.py --workdir=runs/c100                # train, then evaluate
python launch.py --mode=eval --workdir=runs/c100                                  # evaluate its latest checkpoint
python launch.py --mode=eval --config=configs/cifar100.py --checkpoint=dino.pth --workdir=runs/eval
python launch.py --mode=visualize --workdir=runs/c100 --images=a.jpg,b.png        # attention maps
python launch.py --mode=convert --from=checkpoint.pth --to=runs/converted         # PyTorch <-> ours
python launch.py --mode=embed --checkpoint=runs/c100 --images=photos/ --out=emb.npz
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
_MODE = flags.DEFINE_enum(
    "mode",
    "train",
    ["train", "eval", "visualize", "convert", "embed"],
    "train: train then evaluate; eval: evaluate a checkpoint; visualize: attention maps of --images; "
    "convert: --from -> --to between PyTorch files and our checkpoints; embed: CLS features of --images.",
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, results, figures.")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint",
    None,
    "eval/visualize/embed: a training workdir, a converted checkpoint directory or a "
    "PyTorch .pth/.safetensors file (default: --workdir).",
)
_IMAGES = flags.DEFINE_list("images", None, "visualize/embed: image files or folders, comma-separated.")
_OUT = flags.DEFINE_string("out", None, "embed: the .npz file to write.")
_FROM = flags.DEFINE_string("from", None, "convert: source checkpoint.")
_TO = flags.DEFINE_string("to", None, "convert: destination (.pth/.safetensors file or a directory).")
_BACKBONE_ONLY = flags.DEFINE_bool("backbone_only", False, "convert: write only the teacher backbone.")


def _require(**named):
    missing = [f"--{name}" for name, value in named.items() if not value]
    if missing:
        sys.exit(f"error: --mode={_MODE.value} needs {', '.join(missing)}")


def _config_for_eval(checkpoint: str):
    """--config if given, else the config.json of a training workdir."""
    if _CONFIG.value is not None:
        return _CONFIG.value
    from dino_jax import train

    if os.path.isdir(checkpoint) and os.path.exists(os.path.join(checkpoint, "config.json")):
        from configs import common

        # Onto today's defaults, so a run saved before a key existed still loads.
        config = common.base_config()
        config.update(train.load_saved_config(checkpoint))
        return config
    sys.exit(f"error: --mode=eval of {checkpoint} needs --config (which dataset and evaluators to use)")


def run_mode() -> None:
    from dino_jax import config as config_lib, evaluation, train
    from dino_jax.interop import cli

    mode = _MODE.value
    if mode == "train":
        _require(config=_CONFIG.value, workdir=_WORKDIR.value)
        config_lib.validate(_CONFIG.value)  # before anything is read or compiled: a typo costs nothing
        train.run(_CONFIG.value, _WORKDIR.value)
    elif mode == "eval":
        checkpoint = _CHECKPOINT.value or _WORKDIR.value
        _require(workdir=_WORKDIR.value)
        config = _config_for_eval(checkpoint)
        config_lib.validate(config)
        evaluation.evaluate_checkpoint(config, checkpoint, _WORKDIR.value)
    elif mode == "visualize":
        _require(workdir=_WORKDIR.value, images=_IMAGES.value)
        evaluation.visualize(
            _CHECKPOINT.value or _WORKDIR.value, _IMAGES.value, os.path.join(_WORKDIR.value, "attention")
        )
    elif mode == "convert":
        _require(**{"from": flags.FLAGS["from"].value, "to": _TO.value})
        print(cli.convert(flags.FLAGS["from"].value, _TO.value, backbone_only=_BACKBONE_ONLY.value))
    elif mode == "embed":
        checkpoint = _CHECKPOINT.value or _WORKDIR.value
        _require(checkpoint=checkpoint, images=_IMAGES.value, out=_OUT.value)
        result = cli.embed(checkpoint, _IMAGES.value, _OUT.value)
        print(f"wrote {_OUT.value}: {result['features'].shape[0]} x {result['features'].shape[1]} features")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    from dino_jax import errors

    try:
        run_mode()
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
    app.run(main, flags_parser=parse_flags)
