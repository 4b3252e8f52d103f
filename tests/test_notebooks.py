"""The notebooks (notebooks/*.ipynb) run top to bottom in a real Jupyter kernel (nbclient +
ipykernel, the test extra) with their default cells: any cell error fails the test. The kernel
imports jaxpost from this checkout (PYTHONPATH) and runs in a temporary folder, where the
notebooks' `runs/` go. They train the bundled SmolLM2, so they are the suite's slowest tests.
Measured on the 2-core CPU with a cold XLA cache: quickstart 103 s (nearly quiet, load average
0.1-2, from a fresh clone without torch, so its transformers cell was skipped) and rl 190 s
(load average 3-5); both under this test while other jobs kept the load at 11-13: 490 s and
388 s."""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).parents[1]
NOTEBOOKS = ("quickstart.ipynb", "rl.ipynb")
CELL_TIMEOUT_S = 600


def _code_cells(nb):
  return [cell for cell in nb.cells if cell.cell_type == "code"]


def _stdout(nb) -> str:
  return "".join(out.get("text", "") for cell in _code_cells(nb) for out in cell.outputs
                 if out.get("name") == "stdout")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_outputs_are_cleared_in_the_repo(name):
  nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
  nbformat.validate(nb)
  assert [c.execution_count for c in _code_cells(nb)] == [None] * len(_code_cells(nb))
  assert not any(c.outputs for c in _code_cells(nb))


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_top_to_bottom(name, tmp_path):
  nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
  path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
  client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}})
  client.execute(env=dict(os.environ, PYTHONPATH=path))  # CellExecutionError on any cell error
  assert f"from {ROOT / 'jaxpost'}" in _stdout(nb)  # the checkout's jaxpost, not another install
  assert (tmp_path / "runs").is_dir()
