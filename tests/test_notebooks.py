"""Every notebook runs top to bottom in a real Jupyter kernel (nbclient + ipykernel), on tiny
settings given the way papermill gives them: a cell of assignments put right after the cell tagged
`parameters`. The kernel runs in the repository root, where `dino_jax` is importable, so the set-up
cell installs nothing. The quick start's run is the workdir the other two notebooks open."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

from dino_jax import host_memory
from dino_jax.hooks import metrics_log

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(ROOT, "notebooks")
NOTEBOOKS = sorted(name for name in os.listdir(NOTEBOOK_DIR) if name.endswith(".ipynb"))


def read(name: str) -> nbformat.NotebookNode:
    return nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)


def execute(name: str, **parameters) -> nbformat.NotebookNode:
    """`name` executed with `parameters` in place of its parameter cell's values; raises
    nbclient's CellExecutionError (naming the cell and its traceback) when a cell fails."""
    notebook = read(name)
    (index,) = [i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", [])]
    injected = "\n".join(f"{key} = {value!r}" for key, value in parameters.items())
    notebook.cells.insert(
        index + 1, nbformat.v4.new_code_cell(injected, metadata={"tags": ["injected-parameters"]})
    )
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": ROOT}}
    ).execute()
    return notebook


def text_of(notebook: nbformat.NotebookNode) -> str:
    """Everything the cells printed or displayed as text."""
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            parts.append(output.get("text", ""))
            parts.extend(output.get("data", {}).get(kind, "") for kind in ("text/plain", "text/markdown"))
    return "\n".join(parts)


def images_shown(notebook: nbformat.NotebookNode) -> int:
    return sum(
        "image/png" in output.get("data", {}) for cell in notebook.cells for output in cell.get("outputs", [])
    )


@pytest.fixture(scope="module")
def kernel_environment():
    """What the kernels inherit: tiny models compile faster without XLA's optimisation passes."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
        patch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend shows the figures
        yield


@pytest.fixture(scope="module")
def quickstart(kernel_environment, tmp_path_factory, prepared_digits_dir):
    workdir = str(tmp_path_factory.mktemp("quickstart") / "run")
    notebook = execute(
        "quickstart.ipynb", DATASET="digits", SMOKE=True, WORKDIR=workdir, DATA_DIR=prepared_digits_dir
    )
    return notebook, workdir


def test_every_notebook_is_run_here_and_starts_with_the_same_set_up_cell():
    assert NOTEBOOKS == ["pytorch_interop.ipynb", "quickstart.ipynb", "report.ipynb"]
    set_up = {name: read(name).cells[1].source for name in NOTEBOOKS}
    assert "REPO_URL" in set_up["quickstart.ipynb"]
    assert len(set(set_up.values())) == 1, "the set-up cells differ: keep them identical"
    for name in NOTEBOOKS:  # committed without outputs
        assert not any(cell.get("outputs") for cell in read(name).cells), name


def test_quickstart_trains_shows_curves_and_attention_and_evaluates(quickstart):
    notebook, workdir = quickstart
    text = text_of(notebook)
    assert "dino_jax is importable here: nothing to install" in text
    assert "knn_k20_top1" in text and "random_init_knn_k20_top1" in text
    assert "Weighted kNN" in text and "Command: `a notebook" in text  # results.md, displayed
    assert "no TensorBoard here" in text  # not installed here; Colab has it
    # Set before JAX starts (dino_jax/host_memory.py), where it applies.
    kept = host_memory.reason_not_to_keep_here() is None
    assert ("host memory: freed memory kept for reuse" in text) == kept
    assert images_shown(notebook) == 2  # the curves, the first and last attention panels
    # The kNN monitor every 3 steps (the smoke run's 6 steps are less than an epoch) and its panels.
    monitor_steps = [row["step"] for row in metrics_log.read_metrics(workdir) if "monitor_seconds" in row]
    assert monitor_steps == [0, 3, 6]
    panels = ["step_0000000.png", "step_0000003.png", "step_0000006.png"]
    assert sorted(os.listdir(os.path.join(workdir, "attention"))) == panels
    assert os.path.exists(os.path.join(workdir, "report.html"))


def test_pytorch_interop_matches_pytorch_and_exports_back(quickstart, tmp_path):
    _, workdir = quickstart
    notebook = execute("pytorch_interop.ipynb", SOURCE="local", OUT_DIR=str(tmp_path), WORKDIR=workdir)
    text = text_of(notebook)
    difference = float(text.split("max |JAX - PyTorch| of the CLS features:")[1].split()[0])
    assert difference < 1e-4
    assert "tensors, largest change 0.0" in text
    exported = {line.split()[0] for line in text.splitlines() if line.endswith(" entries")}
    assert {"student", "teacher", "dino_loss"} <= exported  # the run, as the reference's checkpoint.pth


def test_report_opens_the_quickstart_run(quickstart):
    _, workdir = quickstart
    notebook = execute("report.ipynb", WORKDIR=workdir)
    text = text_of(notebook)
    assert "| knn_k20_top1 |" in text  # trained against untrained
    assert "logged steps, up to step 6" in text
    assert f"wrote {workdir}/report.html" in text  # written again from the notebook
    # Main curves with the kNN monitor, the other metrics, the attention panels, then the report's
    # kNN curve and feature map.
    assert images_shown(notebook) == 5
