"""The installable package: pyproject.toml's dependency ranges hold the pins of requirements*.txt,
and `pip install .` into a fresh virtual environment gives a `dino-jax` command that trains from a
directory outside the repository, with the recipes shipped in the package.

The venv sees the system's packages (`--system-site-packages`) and pip runs with `--no-index`: the
install resolves every declared dependency against what is installed here, offline, and downloads
nothing."""

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.test_launch import FAST_COMPILE, ROOT


def pins(filename: str) -> dict[str, str]:
    """Package -> pinned version of the `name==version` lines of a requirements file (not those
    of the files it includes)."""
    with open(os.path.join(ROOT, filename)) as f:
        found = re.findall(r"^([A-Za-z0-9_.\-\[\]]+)==(\S+)", f.read(), re.MULTILINE)
    return {canonicalize_name(name.split("[")[0]): version for name, version in found}


def pyproject() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]


def test_dependency_ranges_hold_the_pinned_versions():
    dependencies = {canonicalize_name(r.name): r for r in map(Requirement, pyproject()["dependencies"])}
    pinned = {**pins("requirements.txt"), **pins("requirements-libs.txt")}
    assert set(dependencies) == set(pinned) - {"jaxlib"}  # jax brings the jaxlib it needs
    for name, version in pinned.items():
        if name != "jaxlib":
            assert dependencies[name].specifier.contains(version), (name, version, dependencies[name])


@pytest.mark.parametrize(
    "extra, requirements, package",
    [
        ("cuda12", "requirements-cuda12.txt", "jax-cuda12-plugin"),
        ("cuda13", "requirements-cuda13.txt", "jax-cuda13-plugin"),
        ("tpu", "requirements-tpu.txt", "jax"),
        ("tf", "requirements-tf.txt", "tensorflow-cpu"),
        ("torch", "requirements-dev.txt", "torch"),
    ],
)
def test_each_extra_holds_the_pins_of_its_requirements_file(extra, requirements, package):
    (requirement,) = map(Requirement, pyproject()["optional-dependencies"][extra])
    version = pins(requirements)[package]
    if extra in ("cuda12", "cuda13", "tpu"):
        # jax's own extras, which pin the plugin (or jax[tpu]) to jax's version, as our files do.
        assert requirement.name == "jax" and requirement.extras == {extra}
        assert version == pins("requirements.txt")["jax"]
    assert requirement.specifier.contains(version), (extra, requirement, version)


def test_libtpu_has_one_version():
    # install.sh installs requirements-tpu.txt's libtpu (into aot.LIBTPU_CACHE_DIR outside a TPU VM),
    # where dino_jax/aot.py looks for that version; the compile-only environment pins it too.
    from dino_jax import aot

    assert pins("requirements-tpu.txt")["libtpu"] == aot.LIBTPU_VERSION
    assert pins("requirements-aot.txt")["libtpu"] == aot.LIBTPU_VERSION
    assert aot.LIBTPU_VERSION in aot.LIBTPU_CACHE_DIR


def test_what_pip_install_leaves_in_a_checkout_is_ignored_by_git():
    # setuptools builds in the source tree: `pip install .` in a checkout leaves build/ and
    # dino_jax.egg-info/ there, which must not show as untracked files.
    if not os.path.exists(os.path.join(ROOT, ".git")):
        pytest.skip("not a git checkout")
    left_behind = [
        "build/lib/dino_jax/train.py",
        "build/bdist.linux-x86_64/wheel",
        "dino_jax.egg-info/PKG-INFO",
    ]
    out = subprocess.run(
        ["git", "check-ignore", "--no-index", *left_behind], cwd=ROOT, capture_output=True, text=True
    )
    assert out.stdout.split() == left_behind, out.stdout + out.stderr


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh venv with `pip install .` of a copy of the package sources (setuptools builds in the
    source tree: a copy keeps build/ and *.egg-info out of the checkout). Returns its bin/."""
    root = tmp_path_factory.mktemp("package")
    source = root / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), source / name)
    shutil.copytree(
        os.path.join(ROOT, "dino_jax"), source / "dino_jax", ignore=shutil.ignore_patterns("__pycache__")
    )
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    install = [
        str(venv / "bin" / "python"),
        "-m",
        "pip",
        "install",
        "-q",
        "--no-index",
        "--no-build-isolation",
    ]
    out = subprocess.run([*install, str(source)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return venv / "bin"


def outside_the_repository(command, cwd, **env):
    """Runs `command` in `cwd` with nothing pointing into the checkout (no PYTHONPATH)."""
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=600, env={**environ, **env}
    )


def test_installed_package_is_imported_from_the_venv(installed, tmp_path):
    out = outside_the_repository(
        [str(installed / "python"), "-c", "import dino_jax.cli as c; print(c.__file__, c.recipe_names())"],
        tmp_path,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith(str(installed.parent)), out.stdout
    assert "['cifar100', 'digits', 'tiny_imagenet']" in out.stdout
    # The data files of the package come with it: the GPU description dino_jax.aot compiles for.
    out = outside_the_repository(
        [
            str(installed / "python"),
            "-c",
            "import os, dino_jax.aot as a; t = a.target('h100'); "
            "print(os.path.getsize(os.path.join(a.TARGETS_DIR, t.target_config_file)))",
        ],
        tmp_path,
    )
    assert out.returncode == 0 and int(out.stdout) > 500, out.stderr[-2000:]


def test_dino_jax_command_lists_its_flags(installed, tmp_path):
    out = outside_the_repository([str(installed / "dino-jax"), "--helpfull"], tmp_path)
    for flag in ("--config", "--mode", "--workdir", "--checkpoint", "--[no]backbone_only"):
        assert flag in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
    help_text = " ".join(out.stdout.split())  # absl wraps the help at its own width
    assert "train: train then evaluate" in help_text
    assert "report: report.html and figures of the training run in --workdir" in help_text


def test_dino_jax_command_trains_a_recipe_by_name_outside_the_repository(
    installed, tmp_path, prepared_digits_dir
):
    out = outside_the_repository(
        [
            str(installed / "dino-jax"),
            "--config=digits:smoke",
            "--workdir=run",
            f"--config.dataset.data_dir={prepared_digits_dir}",
            "--config.eval.evaluators=('knn',)",
        ],
        tmp_path,
        **FAST_COMPILE,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    with open(tmp_path / "run" / "results.json") as f:
        assert 0 <= json.load(f)["knn_k20_top1"] <= 100
    with open(tmp_path / "run" / "results.md") as f:
        assert "Command: `dino-jax --config=digits:smoke --workdir=run" in f.read()
