"""dino_jax command line: flags -> one library call per mode (dino_jax.train, dino_jax/modes/).

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

from dino_jax import distributed  # noqa: E402  (its flags; it imports JAX only when main calls it)

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Recipe file, optionally with an argument: configs/cifar100.py[:smoke].", lock_config=True
)
# The modes and the flags each needs; `checkpoint` is --checkpoint or else --workdir.
_NEEDS = {"train": ("config", "workdir"), "eval": ("workdir",), "visualize": ("workdir", "images")}
_NEEDS.update({"convert": ("from", "to"), "embed": ("checkpoint", "images", "out")})
_MODE = flags.DEFINE_enum(
    "mode",
    "train",
    list(_NEEDS),
    "train: train then evaluate; eval: evaluate a checkpoint; visualize: attention maps of --images; "
    "convert: --from -> --to between PyTorch files and our checkpoints; embed: CLS features of --images.",
)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, results, figures.")
flags.DEFINE_string(
    "checkpoint",
    None,
    "eval/visualize/embed: a training workdir, a converted checkpoint directory or a "
    "PyTorch .pth/.safetensors file (default: --workdir).",
)
flags.DEFINE_list("images", None, "visualize/embed: image files or folders, comma-separated.")
flags.DEFINE_string("out", None, "embed: the .npz file to write.")
flags.DEFINE_string("from", None, "convert: source checkpoint.")
flags.DEFINE_string("to", None, "convert: destination (.pth/.safetensors file or a directory).")
flags.DEFINE_bool("backbone_only", False, "convert: write only the teacher backbone.")
distributed.define_flags()  # --coordinator_address, --num_processes, --process_id (docs/multihost.md)


def main(argv):
    """Starts the distributed runtime when asked (before any other JAX call), then `run_mode`; in a
    run of several processes, a process that fails stops the others (dino_jax/distributed.py)."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    try:
        distributed.initialize_from_flags()
    except distributed.DistributedStartError as error:
        sys.exit(f"error: {error}")
    with distributed.failure_stops_all():
        run_mode()


def run_mode():
    """Checks the flags --mode needs, then makes its one library call: `dino_jax.train.run`, or the
    `run` of a dino_jax/modes/ module. A user error is printed as one line, without a traceback."""
    f, mode = flags.FLAGS, _MODE.value
    config = _CONFIG.value
    if config is not None:
        try:  # config_flags defers the error of a file it could not load until the config is read
            config.keys()
        except OSError:
            sys.exit(
                f"error: --config={f['config'].config_filename}: no such config file, or it cannot be read"
            )
    checkpoint = f.checkpoint or f.workdir
    given = {"config": config is not None, "checkpoint": checkpoint}
    missing = [f"--{name}" for name in _NEEDS[mode] if not given.get(name, f[name].value)]
    if missing:
        sys.exit(f"error: --mode={mode} needs {', '.join(missing)}")
    from dino_jax import errors, train
    from dino_jax.modes import convert, embed, eval as eval_mode, visualize

    try:
        if mode == "train":
            train.run(config, f.workdir)
        elif mode == "eval":
            eval_mode.run(config, checkpoint, f.workdir)
        elif mode == "visualize":
            visualize.run(checkpoint, f.images, os.path.join(f.workdir, "attention"))
        elif mode == "convert":
            print(convert.run(f["from"].value, f.to, backbone_only=f.backbone_only))
        else:
            features = embed.run(checkpoint, f.images, f.out)["features"]
            print(f"wrote {f.out}: {features.shape[0]} x {features.shape[1]} features")
    except errors.USER_ERRORS as error:
        sys.exit(f"error: {error}")


def parse_flags(argv):
    """absl's parser, with a wrong `--config.x` key, or a recipe's own error (an unknown
    `:argument`), reported as one line instead of a traceback."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        from dino_jax import errors

        # config_flags re-raises what get_config raised with its traceback in the message; the
        # original is at the end of the chain.
        cause = error
        while cause.__cause__ or cause.__context__:
            cause = cause.__cause__ or cause.__context__
        if isinstance(cause, errors.USER_ERRORS):
            sys.exit(f"error: {cause}")
        sys.exit(f"error: {error}\nPass --helpfull to see the flags.")
    except (AttributeError, KeyError) as error:
        message = str(error).strip("'\"").replace("\\n", " ").replace("\\'", "'")
        sys.exit(f"error: unknown config key in the --config.* overrides: {message}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
