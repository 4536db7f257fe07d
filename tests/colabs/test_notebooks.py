"""Every notebook in colabs/ runs top to bottom on a CPU kernel (headless, nbclient)."""

import os
import sys
from pathlib import Path

import pytest

from tests import xla

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

COLABS = Path(__file__).resolve().parents[2] / "colabs"
NOTEBOOKS = sorted(COLABS.glob("*.ipynb"))


def test_there_are_notebooks():
  assert len(NOTEBOOKS) >= 2, NOTEBOOKS


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, monkeypatch, tmp_path):
  # The kernel is a fresh process: give it this interpreter's environment minus the test suite's
  # simulated device count (a notebook adds its own), and run it from the repository root.
  monkeypatch.setenv("XLA_FLAGS", xla.COMPILE_FAST)
  monkeypatch.setenv("MPLBACKEND", "Agg")
  monkeypatch.setenv("PAXLIKE_NOTEBOOK_STEP_SCALE", "0.1")  # every cell runs; fewer train steps
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(COLABS.parent), *sys.path]))
  notebook = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                   resources={"metadata": {"path": str(COLABS.parent)}})
  client.execute()
  errors = [o for cell in notebook.cells if cell.cell_type == "code"
            for o in cell.get("outputs", []) if o.output_type == "error"]
  assert not errors, errors
