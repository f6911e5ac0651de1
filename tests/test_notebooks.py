"""The notebooks in notebooks/ run top to bottom and are stored without outputs.

Every `notebooks/*.ipynb` is picked up automatically. Each one runs in a fresh python3
kernel, in a temporary working directory, with `UNETPP_TF_NOTEBOOK_SMALL=1` (the notebooks'
tiny settings: a few seconds of training instead of minutes). The kernel is pinned to this
interpreter through a temporary kernelspec, so it imports the same `unetpp_tf` as the tests.
"""

import json
import os
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

import unetpp_tf

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT = 300  # seconds per cell
KERNEL = "python3"


def _read(path):
    return nbformat.read(path, as_version=4)


@pytest.fixture
def kernel_env(tmp_path, monkeypatch):
    """A python3 kernelspec for this interpreter, found first, and the kernel's environment."""
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "Python 3 (tests)",
                "language": "python",
            }
        )
    )
    search = [str(tmp_path / "jupyter"), *filter(None, os.environ.get("JUPYTER_PATH", "").split(os.pathsep))]
    monkeypatch.setenv("JUPYTER_PATH", os.pathsep.join(search))
    work = tmp_path / "work"
    work.mkdir()
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {
        **os.environ,
        "UNETPP_TF_NOTEBOOK_SMALL": "1",
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "TMPDIR": str(scratch),  # tempfile.mkdtemp() in a notebook lands under tmp_path
    }
    return work, env


def test_notebooks_exist():
    assert NOTEBOOKS, f"no notebooks found in {ROOT / 'notebooks'}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_clean(path):
    notebook = _read(path)
    nbformat.validate(notebook)
    assert notebook.nbformat == 4
    assert notebook.metadata.get("kernelspec", {}).get("name") == KERNEL, f"{path.name}: set the python3 kernelspec"
    dirty = [
        index
        for index, cell in enumerate(notebook.cells)
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)
    ]
    assert not dirty, (
        f"{path.name}: code cells {dirty} hold outputs or execution counts; clear all outputs "
        "before saving (e.g. `jupyter nbconvert --clear-output --inplace {path}`)."
    )
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and "google.colab" in code[0].source, f"{path.name}: the first code cell must be the install cell"
    assert any("UNETPP_TF_NOTEBOOK_SMALL" in cell.source for cell in code), f"{path.name}: no small-mode switch"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, kernel_env, record_property):
    work, env = kernel_env
    notebook = _read(path)
    probe = "import sys, unetpp_tf\nprint(sys.executable)\nprint(unetpp_tf.__file__)"
    notebook.cells.append(nbformat.v4.new_code_cell(probe))
    client = NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT,
        kernel_name=KERNEL,
        resources={"metadata": {"path": str(work)}},
    )
    start = time.perf_counter()
    client.execute(env=env)  # raises CellExecutionError, naming the cell, on the first error
    seconds = time.perf_counter() - start
    record_property("seconds", round(seconds, 1))
    print(f"{path.name}: {seconds:.1f} s")

    errors = [out for cell in notebook.cells for out in cell.get("outputs", []) if out.output_type == "error"]
    assert not errors
    lines = "".join(out.get("text", "") for out in notebook.cells[-1].outputs).splitlines()
    assert lines[:2] == [sys.executable, unetpp_tf.__file__], "the kernel ran another interpreter or package"
    figures = sum("image/png" in out.get("data", {}) for cell in notebook.cells for out in cell.get("outputs", []))
    assert figures, f"{path.name} displayed no figure"
    litter = sorted(p.name for p in work.iterdir())
    assert not litter, (
        f"{path.name} wrote {litter} into its working directory; write under tempfile.mkdtemp() so that "
        "running a notebook from the repository leaves it clean."
    )
