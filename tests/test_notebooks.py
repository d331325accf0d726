"""The teaching notebooks: each runs top to bottom, and each is committed executed.

Every notebook in `notebooks/` is re-executed with nbclient in a fresh
`python3` kernel, with `notebooks/` as the working directory and
`MNV2REF_SHARED` pointing at the fixtures the `shared_dir` fixture found; any
cell error fails the test. The target is under 90 s per notebook (all six in
under 4 minutes) on 2 cores; a run over twice the target fails, so that a
notebook that has become slow is noticed without making the test flaky on a
busy machine.

The committed files are checked without running them: executed (every code
cell has an execution count, no error outputs), every cell that draws a figure
has its image saved, at least one image per notebook, modest size.
"""

import base64
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = [
    "01_depthwise_separable.ipynb",
    "02_inverted_residual.ipynb",
    "03_checkpoint_format.ipynb",
    "04_forward_pass.ipynb",
    "05_golden_comparison.ipynb",
    "06_performance.ipynb",
]
TARGET_SECONDS = 90          # per notebook, on 2 cores
HARD_LIMIT_SECONDS = 2 * TARGET_SECONDS
CELL_TIMEOUT_SECONDS = 120   # the slowest cell (Numba compilation + timings) needs ~40 s
MAX_BYTES = 1_000_000        # outputs are committed: keep the files modest
FIGURE_CALLS = ("plt.show()", "plt.subplots(", "plt.figure(")


def read(name):
    return nbformat.read(NOTEBOOKS_DIR / name, as_version=4)


def code_cells(nb):
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def images(cell):
    return [out for out in cell.get("outputs", [])
            if out.get("output_type") in ("display_data", "execute_result")
            and "image/png" in out.get("data", {})]


def test_every_notebook_is_listed():
    assert sorted(p.name for p in NOTEBOOKS_DIR.glob("*.ipynb")) == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_committed_executed(name):
    path = NOTEBOOKS_DIR / name
    assert path.stat().st_size < MAX_BYTES, f"{name} is {path.stat().st_size} bytes"
    nb = read(name)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    cells = code_cells(nb)
    assert cells, f"{name} has no code cells"
    not_run = [i for i, cell in enumerate(cells) if cell.get("execution_count") is None]
    assert not not_run, f"{name}: code cells {not_run} were not executed before committing"
    errors = [out.get("ename") for cell in cells for out in cell.get("outputs", [])
              if out.get("output_type") == "error"]
    assert not errors, f"{name} was committed with errors: {errors}"
    without_figure = [i for i, cell in enumerate(cells)
                      if any(call in cell.source for call in FIGURE_CALLS) and not images(cell)]
    assert not without_figure, f"{name}: code cells {without_figure} draw a figure but have no saved image"
    all_images = [out for cell in cells for out in images(cell)]
    assert all_images, f"{name} has no image output"
    for out in all_images:  # each is a real PNG
        assert base64.b64decode(out["data"]["image/png"])[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, shared_dir, monkeypatch):
    # The kernel inherits the environment: point it at the fixtures the fixture found.
    monkeypatch.setenv("MNV2REF_SHARED", str(shared_dir))
    nb = read(name)
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_SECONDS, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS_DIR)}})
    start = time.perf_counter()
    try:
        client.execute()
    except CellExecutionError as error:
        pytest.fail(f"{name} failed:\n{error}", pytrace=False)
    elapsed = time.perf_counter() - start
    print(f"{name}: {elapsed:.1f} s")
    assert elapsed < HARD_LIMIT_SECONDS, (
        f"{name} took {elapsed:.0f} s, over twice the {TARGET_SECONDS} s target")
    assert any(images(cell) for cell in code_cells(nb)), f"{name} made no figure"
