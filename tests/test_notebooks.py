"""The Colab notebooks: each runs top to bottom on CPU in tiny mode, and the repository holds
them without outputs.

Each notebook is executed by a fresh Jupyter kernel running this interpreter, with this checkout
first on PYTHONPATH, `JAXLM_NOTEBOOK_TINY=1` (the notebooks' one switch for a smoke run) and a
temporary working directory and data cache, so nothing is written into the repository.
"""

import glob
import os
import re
import sys

import ipykernel  # noqa: F401 - the notebooks' kernel: fail here, naming it, when absent
import nbclient
import nbformat
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "colab", "*.ipynb")))
CELL_TIMEOUT_S = 600  # a stuck cell fails the test instead of hanging CI


def test_the_three_notebooks_exist():
    names = {os.path.basename(p) for p in NOTEBOOKS}
    assert {"quickstart.ipynb", "continued_pretraining.ipynb", "data_pipeline.ipynb"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_readme_links_the_notebook_with_a_description_and_colab(path):
    name = os.path.basename(path)
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        lines = [line for line in f if line.startswith(f"- `colab/{name}`: ")]
    assert len(lines) == 1, f"README.md needs one '- `colab/{name}`: <description>' line"
    assert len(lines[0].split(": ", 1)[1].strip()) > 20
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        colab = re.findall(r"https://colab\.research\.google\.com/github/\S+?\.ipynb", f.read())
    assert any(url.endswith(f"/jaxlm/blob/main/colab/{name}") for url in colab), colab


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code
    for i, cell in enumerate(code):
        assert cell.outputs == [], f"code cell {i} has outputs: clear them before committing"
        assert cell.execution_count is None, f"code cell {i} has an execution count"


def kernel_env(monkeypatch, tmp_path):
    """The kernel's environment: a plain one-device CPU runtime in tiny mode, this checkout."""
    monkeypatch.setenv("JAXLM_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("JAXLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    path = os.environ.get("PYTHONPATH", "")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (REPO, path) if p))
    # conftest gives this process 8 fake devices; a notebook sees the runtime as a user would.
    flags = os.environ.get("XLA_FLAGS", "").split()
    flags = [f for f in flags if not f.startswith("--xla_force_host_platform_device_count")]
    # Compiling dominates a tiny run: unoptimised CPU code compiles ~40% faster, same losses.
    flags.append("--xla_backend_optimization_level=0")
    monkeypatch.setenv("XLA_FLAGS", " ".join(flags))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend draws PNGs


def execute(path, tmp_path):
    """The notebook after running every cell in a kernel of this interpreter; raises on an error.

    A last cell is added that prints which interpreter and which jaxlm the kernel ran.
    """
    nb = nbformat.read(path, as_version=4)
    probe = "import sys, jaxlm\nprint(sys.executable)\nprint(jaxlm.__file__)"
    nb.cells.append(nbformat.v4.new_code_cell(probe))
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(workdir)}},
    )
    client.execute()  # nbclient.exceptions.CellExecutionError names the cell and its traceback
    return nb


def outputs(nb, tag):
    (cell,) = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
    return cell.outputs


@pytest.mark.slow  # all three: ~48 s of CPU, ~92 s wall on a busy 2-core machine
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs_top_to_bottom(path, monkeypatch, tmp_path):
    kernel_env(monkeypatch, tmp_path)
    nb = execute(path, tmp_path)
    executable, jaxlm_init = nb.cells[-1].outputs[0]["text"].split()
    assert executable == sys.executable  # the kernel is this venv's interpreter ...
    assert jaxlm_init == os.path.join(REPO, "jaxlm", "__init__.py")  # ... running this checkout
    assert os.listdir(tmp_path / "cwd") == ["runs"]  # what it wrote is under its working dir
    first = nb.cells[[c.cell_type for c in nb.cells].index("code")]
    assert "tiny mode" in "".join(o.get("text", "") for o in first.outputs)
    if os.path.basename(path) == "quickstart.ipynb":
        plot = outputs(nb, "loss-plot")
        assert any("image/png" in o.get("data", {}) for o in plot), plot
        text = "".join(o.get("text", "") for o in outputs(nb, "sample"))
        header, _, sample = text.partition("\n")
        assert header.startswith("sample from step 20"), text
        prompt = "def fibonacci(n):\n"  # configs/base.py's sample prompt
        assert sample.startswith(prompt) and sample[len(prompt) :].strip(), text
