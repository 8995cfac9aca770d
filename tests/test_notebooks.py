"""The notebooks run top to bottom on tiny settings (DINO_JAX_NOTEBOOK_SMOKE=1), as a user would
run them: code cells in order in one fresh interpreter; shell/magic lines (`!`, `%`) are the Colab
set-up and are skipped."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(name for name in os.listdir(os.path.join(ROOT, "notebooks")) if name.endswith(".ipynb"))


def notebook_source(path):
    with open(path) as f:
        notebook = json.load(f)
    cells = ["".join(cell["source"]) for cell in notebook["cells"] if cell["cell_type"] == "code"]
    lines = [line for cell in cells for line in cell.splitlines() if not line.lstrip().startswith(("!", "%"))]
    return "import matplotlib\nmatplotlib.use('Agg')\n" + "\n".join(lines)


def test_there_is_a_notebook():
    assert NOTEBOOKS


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, tmp_path):
    env = dict(
        os.environ,
        DINO_JAX_NOTEBOOK_SMOKE="1",
        DINO_JAX_NOTEBOOK_WORKDIR=str(tmp_path / "run"),
        DINO_JAX_NOTEBOOK_DATA_DIR=str(tmp_path / "tfds"),
        MPLBACKEND="Agg",
        JAX_DISABLE_MOST_OPTIMIZATIONS="1",  # tiny settings: compile time dominates
    )
    out = subprocess.run(
        [sys.executable, "-c", notebook_source(os.path.join(ROOT, "notebooks", name))],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert "knn_k20_top1" in out.stdout
    difference = float(out.stdout.split("max |JAX - PyTorch| of the CLS features:")[1].split()[0])
    assert difference < 1e-4
