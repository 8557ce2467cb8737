"""Every notebook in colabs/ executes without error, and is committed without outputs.

Notebooks are discovered (`colabs/*.ipynb`), so a new one is tested as soon as it is
added. They run with SJ_COLAB_CI=1, which each notebook reads to pick its smallest
size, in a temporary working directory, on the `python3` kernel of the interpreter
running the tests (jupyter_client substitutes `sys.executable` for "python").

Compilation is most of a notebook's CPU time, and the notebooks train the same tiny
model on the same config as other tests, so every kernel inherits the test session's
persistent XLA compilation cache (tests/conftest.py: every program, fresh per session,
shared with the other tests and their subprocesses).
"""

import json
import pathlib

import nbclient
import nbformat
import pytest

COLABS = pathlib.Path(__file__).resolve().parents[1] / "colabs"
NOTEBOOKS = sorted(COLABS.glob("*.ipynb"))
CELL_TIMEOUT_S = 300  # Per cell; a whole notebook takes ~10-60 s on 2 CPU cores.


def _ids(paths):
  return [p.stem for p in paths]


def test_notebooks_exist():
  names = {p.name for p in NOTEBOOKS}
  assert {"simfluence_quickstart.ipynb", "attribute_your_own_model.ipynb"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_outputs_stripped(path):
  notebook = json.loads(path.read_text())
  for index, cell in enumerate(notebook["cells"]):
    if cell["cell_type"] != "code":
      continue
    assert cell.get("outputs") == [], (
        f"{path.name}: code cell {index} has outputs; clear them before committing "
        f"(e.g. `jupyter nbconvert --clear-output --inplace {path.name}`).")
    assert cell.get("execution_count") is None, (
        f"{path.name}: code cell {index} has execution_count "
        f"{cell.get('execution_count')}; clear outputs before committing.")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_no_placeholder_repository_url(path):
  """The repository URL comes from the user (or the environment), never a made-up one."""
  text = path.read_text()
  assert "YOUR_ORG" not in text and "github.com/" not in text, path.name
  assert 'os.environ.get(\\"SIMFLUENCE_JAX_REPO_URL\\", \\"\\")' in text, path.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_executes(path, tmp_path, monkeypatch):
  monkeypatch.setenv("SJ_COLAB_CI", "1")  # the kernel inherits the environment
  monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
  monkeypatch.chdir(tmp_path)
  notebook = nbformat.read(str(path), as_version=4)
  client = nbclient.NotebookClient(
      notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
      resources={"metadata": {"path": str(tmp_path)}})
  client.execute()  # raises CellExecutionError naming the cell and the traceback
  errors = [output for cell in notebook.cells if cell.cell_type == "code"
            for output in cell.outputs if output.output_type == "error"]
  assert not errors, errors
