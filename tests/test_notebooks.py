"""Every notebook in notebooks/ runs top to bottom, and is committed with its outputs stripped."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 1200  # a loaded 2-core machine runs the evaluation cell in ~10 min


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, cell in enumerate(nb.cells)
             if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count") is not None)]
    assert not dirty, (
        f"{path.name} has outputs in cells {dirty}: strip them before committing, e.g. "
        f"jupyter nbconvert --clear-output --inplace {path.relative_to(NOTEBOOKS_DIR.parent)}"
    )


@pytest.mark.integration
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_top_to_bottom(path, real_home, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    # A fresh cache home per notebook, sharing the model converted once for the session.
    home = tmp_path / "cag-home"
    home.mkdir()
    (home / "models").symlink_to(real_home / "models", target_is_directory=True)
    monkeypatch.setenv("CAG_HOME", str(home))  # the kernel inherits this environment
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                            resources={"metadata": {"path": str(NOTEBOOKS_DIR)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on the first failure

    errors = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs if out.output_type == "error"]
    assert not errors
    assert (home / "store" / "index.sqlite").is_file(), "the notebook did not use $CAG_HOME"
    images = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
              if "image/png" in out.get("data", {})]
    if path.name == "quickstart.ipynb":
        assert images, "the quickstart shows the benchmark plot inline"
