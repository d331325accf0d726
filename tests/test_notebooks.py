"""The teaching notebooks: committed executed, runnable anywhere, exercises that check.

Static checks (no kernel): every notebook is saved executed, with its figures,
no errors and no machine paths in its outputs; it has at least three
exercises, each a cell tagged `exercise` (metadata `mnv2ref.exercise` names
the function the student writes, which raises NotImplementedError until then)
followed by a cell tagged `check`, which printed "not attempted yet" when the
notebook was saved; `notebooks/solutions/NN_name.py` has a function of that
name for each.

Runs: every notebook is re-executed with nbclient in a fresh `python3`
kernel, in `notebooks/`, with the fixtures the `shared_dir` fixture found and
each exercise cell replaced by the import of its solution: every checking cell
must print "<exercise>: correct". Notebooks 01 and 04 also run as committed
with no data at all (an empty fixtures folder, no weights, an empty download
cache, a scratch working directory) and must finish and say they use random
weights. The target is ~2.5 minutes for the whole file on 2 cores; a notebook
over its hard limit fails, so that a slow one is noticed.
"""

import base64
import os
import re
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS_DIR = ROOT / "notebooks"
SOLUTIONS_DIR = NOTEBOOKS_DIR / "solutions"
NOTEBOOKS = [
    "01_depthwise_separable.ipynb",
    "02_inverted_residual.ipynb",
    "03_checkpoint_format.ipynb",
    "04_forward_pass.ipynb",
    "05_golden_comparison.ipynb",
    "06_performance.ipynb",
    "07_verify_your_port.ipynb",
]
HARD_LIMIT_SECONDS = 150     # per notebook, on 2 cores: the slowest takes ~30 s, plus up to ~60 s
CELL_TIMEOUT_SECONDS = 120   # of Numba compilation in 06 when its on-disk cache is cold
MAX_BYTES = 1_200_000        # outputs are committed: keep the files modest
MIN_EXERCISES = 3
FIGURE_CALLS = ("plt.show()", "plt.subplots(", "plt.figure(")
MACHINE_PATHS = ("/work/", "/root/", "/home/", "/tmp/", "/Users/")
RANDOM_NOTICE = "random weights: shapes, FLOPs and timings are real, values and classes are not"


def read(name):
    return nbformat.read(NOTEBOOKS_DIR / name, as_version=4)


def code_cells(nb):
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def tagged(nb, tag):
    return [cell for cell in code_cells(nb) if tag in cell.metadata.get("tags", [])]


def images(cell):
    return [out for out in cell.get("outputs", [])
            if out.get("output_type") in ("display_data", "execute_result")
            and "image/png" in out.get("data", {})]


def text_of(cell):
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            parts.append(out.get("text", ""))
        elif "data" in out:
            parts.append(out["data"].get("text/plain", ""))
        elif out.get("output_type") == "error":
            parts.append("\n".join(out.get("traceback", [])))
    return "".join(parts)


def exercise_name(cell):
    return cell.metadata["mnv2ref"]["exercise"]


def solution_file(name):
    return SOLUTIONS_DIR / (Path(name).stem + ".py")


def verdicts(nb):
    """{exercise: the line its checking cell printed}, in notebook order."""
    found = {}
    for cell in tagged(nb, "check"):
        for line in text_of(cell).splitlines():
            match = re.match(r"(\w+): (correct|not attempted yet|not yet|your code raised)", line)
            if match:
                found[match.group(1)] = line
    return found


def run(nb, cwd, env, monkeypatch):
    for key, value in env.items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    # The kernel inherits the environment: make it import this checkout's mnv2ref.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_SECONDS, kernel_name="python3",
                            resources={"metadata": {"path": str(cwd)}})
    start = time.perf_counter()
    try:
        client.execute()
    except CellExecutionError as error:
        pytest.fail(f"failed:\n{error}", pytrace=False)
    return time.perf_counter() - start


def test_every_notebook_is_listed():
    assert sorted(p.name for p in NOTEBOOKS_DIR.glob("*.ipynb")) == sorted(NOTEBOOKS)
    assert sorted(p.name for p in SOLUTIONS_DIR.glob("*.py")) == sorted(
        solution_file(name).name for name in NOTEBOOKS)


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
                      if any(call in cell.source for call in FIGURE_CALLS) and not images(cell)
                      and "skipped: " not in text_of(cell)]
    assert not without_figure, f"{name}: code cells {without_figure} draw a figure but have no saved image"
    all_images = [out for cell in cells for out in images(cell)]
    assert all_images, f"{name} has no image output"
    for out in all_images:  # each is a real PNG
        assert base64.b64decode(out["data"]["image/png"])[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_outputs_name_no_machine_paths(name):
    nb = read(name)
    for i, cell in enumerate(code_cells(nb)):
        text = text_of(cell)
        found = [p for p in MACHINE_PATHS if p in text]
        assert not found, f"{name}: code cell {i} prints a machine path ({found[0]}): {text[:300]}"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_exercises_are_paired_with_checks_and_solutions(name):
    nb = read(name)
    exercises = [exercise_name(cell) for cell in tagged(nb, "exercise")]
    assert len(exercises) >= MIN_EXERCISES, f"{name} has {len(exercises)} exercises"
    assert len(set(exercises)) == len(exercises), f"{name}: exercise names repeat: {exercises}"
    for cell in tagged(nb, "exercise"):
        assert "raise NotImplementedError" in cell.source, f"{name}: {exercise_name(cell)} is not left to do"
        following = nb.cells[nb.cells.index(cell) + 1]
        assert "check" in following.metadata.get("tags", []), (
            f"{name}: exercise {exercise_name(cell)} is not followed by its checking cell")
    # As committed, nothing is solved, and every checker said so instead of crashing.
    assert verdicts(nb) == {ex: f"{ex}: not attempted yet (fill in the cell above, then run this one again)"
                            for ex in exercises}
    source = solution_file(name).read_text(encoding="utf-8")
    missing = [ex for ex in exercises if not re.search(rf"^def {ex}\(", source, re.M)]
    assert not missing, f"{solution_file(name).name} lacks {missing}"


def with_solutions(nb, name):
    """The notebook with every exercise cell replaced by its solution's import."""
    path = solution_file(name)
    for cell in tagged(nb, "exercise"):
        ex = exercise_name(cell)
        cell.source = (f"import importlib.util as _util\n"
                       f"_spec = _util.spec_from_file_location('solutions', {str(path)!r})\n"
                       f"_solutions = _util.module_from_spec(_spec)\n"
                       f"_spec.loader.exec_module(_solutions)\n"
                       f"{ex} = _solutions.{ex}")
    return nb


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_with_its_solutions(name, shared_dir, monkeypatch):
    nb = with_solutions(read(name), name)
    exercises = [exercise_name(cell) for cell in tagged(nb, "exercise")]
    elapsed = run(nb, NOTEBOOKS_DIR, {"MNV2REF_SHARED": str(shared_dir)}, monkeypatch)
    print(f"{name}: {elapsed:.1f} s")
    assert verdicts(nb) == {ex: f"{ex}: correct" for ex in exercises}
    assert any(images(cell) for cell in code_cells(nb)), f"{name} made no figure"
    assert elapsed < HARD_LIMIT_SECONDS, f"{name} took {elapsed:.0f} s, over {HARD_LIMIT_SECONDS} s"


@pytest.mark.parametrize("name", ["01_depthwise_separable.ipynb", "04_forward_pass.ipynb"])
def test_notebook_runs_from_a_bare_clone(name, tmp_path, monkeypatch):
    empty_shared, home, cwd = (tmp_path / d for d in ("shared", "home", "cwd"))
    for folder in (empty_shared, home, cwd):
        folder.mkdir()
    env = {"MNV2REF_SHARED": str(empty_shared), "MNV2REF_HOME": str(home),
           "XDG_CACHE_HOME": str(home), "MNV2REF_WEIGHTS": None}
    monkeypatch.chdir(cwd)
    for key, value in env.items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    from mnv2ref.errors import WeightsError
    from mnv2ref.resources import find_weights

    try:
        found = find_weights()
    except WeightsError:
        found = None
    if found is not None:
        pytest.skip(f"this checkout has weights of its own ({found.name}): not a bare clone")
    nb = read(name)
    elapsed = run(nb, cwd, env, monkeypatch)
    print(f"{name} without data: {elapsed:.1f} s")
    outputs = "".join(text_of(cell) for cell in code_cells(nb))
    assert RANDOM_NOTICE in outputs
    assert "not attempted yet" in outputs
    assert not [p for p in MACHINE_PATHS if p in outputs]


def test_check_reports_every_state(capsys):
    from mnv2ref.teaching import check

    def todo():
        raise NotImplementedError

    def wrong():
        assert 1 == 2, "expected 2, got 1"

    def crash():
        return {}["missing"]

    for name, test in (("ex_todo", todo), ("ex_wrong", wrong), ("ex_crash", crash),
                       ("ex_right", lambda: None)):
        check(name, test)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("ex_todo: not attempted yet")
    assert lines[1] == "ex_wrong: not yet: expected 2, got 1"
    assert lines[2].startswith("ex_crash: your code raised KeyError: 'missing'")
    assert lines[3] == "ex_right: correct"


def test_random_weights_when_nothing_is_there(tmp_path, monkeypatch, capsys):
    import mnv2ref
    from mnv2ref import teaching

    monkeypatch.setenv("MNV2REF_SHARED", str(tmp_path))
    monkeypatch.setenv("MNV2REF_HOME", str(tmp_path))
    monkeypatch.delenv("MNV2REF_WEIGHTS", raising=False)
    monkeypatch.setattr(teaching, "find_weights", _no_weights)
    data = teaching.teaching_data()
    assert not (data.real_backbone or data.real_classifier or data.goldens or data.fixtures)
    assert data.golden("backbone_1.0_224_chelsea") is None and data.image("coffee") is None
    assert data.image("chelsea").dtype.name == "uint8"
    assert (data.model.depth_multiplier, data.model.num_classes) == (1.0, 1001)
    assert RANDOM_NOTICE in capsys.readouterr().out
    again = mnv2ref.MobileNetV2.random(seed=teaching.RANDOM_SEED)  # seeded: the same weights every time
    name = "MobilenetV2/Conv/weights"
    assert (again.variables[name] == data.model.variables[name]).all()


def test_fixtures_are_preferred(shared_dir, monkeypatch, capsys):
    from mnv2ref.teaching import teaching_data

    monkeypatch.setenv("MNV2REF_SHARED", str(shared_dir))
    data = teaching_data()
    assert data.real_backbone and data.goldens and not data.real_classifier
    assert set(data.images) == {"chelsea", "coffee"}
    printed = capsys.readouterr().out
    assert str(shared_dir) not in printed and str(shared_dir) not in repr(data.model)
    assert RANDOM_NOTICE not in printed


def test_your_weights_come_second(shared_dir, tmp_path, monkeypatch, capsys):
    from mnv2ref.teaching import teaching_data

    monkeypatch.setenv("MNV2REF_SHARED", str(tmp_path))      # no fixtures ...
    monkeypatch.setenv("MNV2REF_WEIGHTS", str(shared_dir / "checkpoints/bench_mobilenet_v2_1.0_224/model.ckpt"))
    data = teaching_data()                                   # ... but weights with a classifier
    assert data.real_backbone and data.real_classifier and not data.goldens
    assert data.model.num_classes == 1001 and set(data.images) == {"chelsea"}
    printed = capsys.readouterr().out
    assert "your weights: bench_mobilenet_v2_1.0_224/model.ckpt" in printed and str(shared_dir) not in printed + repr(data.model)


def _no_weights(*args):
    from mnv2ref.errors import WeightsError

    raise WeightsError("no weights (test)")

