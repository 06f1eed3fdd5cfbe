"""The research-question notebooks (notebooks/R1..R4.ipynb, the seeds' section 12) execute top to bottom
on the offline pairs (tiny counts; their own asserts check the known answers). One kernel serves all
four (torch and the models are imported once), each notebook with a fresh client, in file order."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("R*.ipynb"))


def test_one_notebook_per_research_question():
    assert [p.stem for p in NOTEBOOKS] == ["R1", "R2", "R3", "R4"]


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """A started python3 kernel whose MECHDIFF_NB_OUT is a temporary directory."""
    from jupyter_client import KernelManager
    out = tmp_path_factory.mktemp("notebooks")
    km = KernelManager(kernel_name="python3")
    km.start_kernel(cwd=str(out), env={**os.environ, "MECHDIFF_NB_OUT": str(out), "MECHDIFF_PROGRESS": "0"})
    yield km, out
    km.shutdown_kernel(now=True)


@pytest.mark.real
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, kernel):
    import nbformat
    from nbclient import NotebookClient

    km, out = kernel
    nb = nbformat.read(path, as_version=4)
    t0 = time.perf_counter()
    NotebookClient(nb, km=km, timeout=600, resources={"metadata": {"path": str(out)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "every notebook shows its figure"
    assert (out / path.stem.lower()).is_dir() or path.stem == "R4"
    print(f"{path.name}: {time.perf_counter() - t0:.1f} s")
