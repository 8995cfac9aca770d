"""dino_jax's command line: `dino-jax` once the package is installed, `python launch.py` in a
checkout. Flags -> one library call per mode (`dino_jax.train`, dino_jax/modes/).

dino-jax --config=digits --workdir=runs/digits                         # train, then evaluate
dino-jax --config=configs/cifar100.py:smoke --workdir=/tmp/smoke       # a recipe file, with its argument
dino-jax --mode=eval --workdir=runs/c100                               # evaluate its latest checkpoint
dino-jax --mode=eval --config=cifar100 --checkpoint=dino.pth --workdir=runs/eval
dino-jax --mode=visualize --workdir=runs/c100 --images=a.jpg,b.png     # attention maps
dino-jax --mode=convert --from=checkpoint.pth --to=runs/converted      # PyTorch <-> ours
dino-jax --mode=embed --checkpoint=runs/c100 --images=photos/ --out=emb.npz
dino-jax --mode=report --workdir=runs/c100                             # report.html of a run, finished or not

`--config` takes a recipe file (`configs/cifar100.py`, or any file with a `get_config(arg)`) or the
name of a recipe shipped in dino_jax/configs/ (`cifar100`, `digits`, `tiny_imagenet`), so the same
command works in a checkout and from any directory once installed.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable

# TensorFlow (used only to prepare datasets) and orbax/TFDS INFO lines would drown the progress line.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from dino_jax import distributed, host_memory  # noqa: E402  (distributed imports JAX only when main calls it)

RECIPE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
# Modules of dino_jax/configs/ that are not recipes.
NOT_RECIPES = ("__init__.py", "base.py")


def recipe_names() -> list[str]:
    """The recipes shipped with the package: the names `--config` takes instead of a file."""
    return sorted(
        name[: -len(".py")]
        for name in os.listdir(RECIPE_DIR)
        if name.endswith(".py") and name not in NOT_RECIPES
    )


def resolve_config(value: str) -> str:
    """`--config`'s value with a recipe name (`digits`, `cifar100:smoke`) replaced by the path of
    that recipe's file in the package; anything else (a file path) is returned as it is."""
    name, colon, argument = value.partition(":")
    if name in recipe_names():
        return os.path.join(RECIPE_DIR, f"{name}.py") + colon + argument
    return value


_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "A recipe file (configs/cifar100.py) or the name of a recipe shipped with dino_jax "
    f"({', '.join(recipe_names())}), optionally with an argument: cifar100:smoke.",
    lock_config=True,
)


@dataclasses.dataclass(frozen=True)
class Mode:
    """One `--mode`: the flags it needs (`checkpoint` is --checkpoint or else --workdir), its help,
    and its call, `run(flags.FLAGS, config, checkpoint)`."""

    needs: tuple[str, ...]
    help: str
    run: Callable[[flags.FlagValues, object, str | None], None]


def _train(f, config, checkpoint):
    from dino_jax import train

    train.run(config, f.workdir)


def _eval(f, config, checkpoint):
    from dino_jax.modes import eval as eval_mode

    eval_mode.run(config, checkpoint, f.workdir)


def _visualize(f, config, checkpoint):
    from dino_jax.modes import visualize

    visualize.run(checkpoint, f.images, os.path.join(f.workdir, "attention"))


def _convert(f, config, checkpoint):
    from dino_jax.modes import convert

    print(convert.run(f["from"].value, f.to, backbone_only=f.backbone_only))


def _embed(f, config, checkpoint):
    from dino_jax.modes import embed

    features = embed.run(checkpoint, f.images, f.out)["features"]
    print(f"wrote {f.out}: {features.shape[0]} x {features.shape[1]} features")


def _report(f, config, checkpoint):
    from dino_jax.modes import report

    report.run(f.workdir, config=config)


# A new mode is one entry here (and its function above).
MODES: dict[str, Mode] = {
    "train": Mode(("config", "workdir"), "train then evaluate", _train),
    "eval": Mode(("workdir",), "evaluate a checkpoint", _eval),
    "visualize": Mode(("workdir", "images"), "attention maps of --images", _visualize),
    "convert": Mode(("from", "to"), "--from -> --to between PyTorch files and our checkpoints", _convert),
    "embed": Mode(("checkpoint", "images", "out"), "CLS features of --images", _embed),
    "report": Mode(
        ("workdir",), "report.html and figures of the training run in --workdir (finished or not)", _report
    ),
}

_MODE = flags.DEFINE_enum(
    "mode", "train", list(MODES), "; ".join(f"{name}: {mode.help}" for name, mode in MODES.items()) + "."
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
    """Checks the flags --mode needs, then makes its one library call. A user error is printed as
    one line, without a traceback."""
    f, mode = flags.FLAGS, MODES[_MODE.value]
    config = _CONFIG.value
    if config is not None:
        try:  # config_flags defers the error of a file it could not load until the config is read
            config.keys()
        except OSError:
            sys.exit(
                f"error: --config={f['config'].config_filename}: no such config file, or it cannot be "
                f"read (the recipes by name: {', '.join(recipe_names())})"
            )
    checkpoint = f.checkpoint or f.workdir
    given = {"config": config is not None, "checkpoint": checkpoint}
    missing = [f"--{name}" for name in mode.needs if not given.get(name, f[name].value)]
    if missing:
        sys.exit(f"error: --mode={_MODE.value} needs {', '.join(missing)}")
    from dino_jax import errors

    try:
        mode.run(f, config, checkpoint)
    except errors.user_errors() as error:
        sys.exit(f"error: {error}")


def _with_recipe_paths(argv: list[str]) -> list[str]:
    """`argv` with a recipe name given to --config (`--config=NAME` or `--config NAME`) replaced
    by its file, which is what config_flags loads."""
    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            argv[i] = "--config=" + resolve_config(arg[len("--config=") :])
        elif arg == "--config" and i + 1 < len(argv):
            argv[i + 1] = resolve_config(argv[i + 1])
    return argv


def parse_flags(argv):
    """absl's parser, with recipe names resolved, and a wrong `--config.x` key or a recipe's own
    error (an unknown `:argument`) reported as one line instead of a traceback."""
    try:
        return flags.FLAGS(_with_recipe_paths(argv))
    except flags.Error as error:
        from dino_jax import errors

        # config_flags re-raises what get_config raised with its traceback in the message; the
        # original is at the end of the chain.
        cause = error
        while cause.__cause__ or cause.__context__:
            cause = cause.__cause__ or cause.__context__
        if isinstance(cause, errors.user_errors()):
            sys.exit(f"error: {cause}")
        sys.exit(f"error: {error}\nPass --helpfull to see the flags.")
    except (AttributeError, KeyError) as error:
        message = str(error).strip("'\"").replace("\\n", " ").replace("\\'", "'")
        sys.exit(f"error: unknown config key in the --config.* overrides: {message}")


def run() -> None:
    """The `dino-jax` command (pyproject.toml's entry point) and `python launch.py`."""
    host_memory.keep_freed_host_memory()  # before JAX starts its CPU client (host_memory.py)
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
