"""The tutorial notebooks in notebooks/: stored without outputs, each with a title and a final
cell of checks.

They are *executed* by the documentation build (``scripts/docs.sh``, run by
``scripts/test.sh`` after pytest): MyST-NB runs every notebook on each build with a kernel
pinned to the build's interpreter, and a cell error fails the build. Notebooks carry their own
checks (a final cell of ``assert``s), so one that runs but gets the wrong answer fails it too.
Running them once, there, keeps the suite inside CI's time budget.
"""

import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def test_notebooks_exist():
    assert NOTEBOOKS, f"no notebooks found in {REPO / 'notebooks'}"


def test_notebooks_stored_without_outputs():
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        dirty = [
            i
            for i, c in enumerate(nb.cells)
            if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count"))
        ]
        assert not dirty, f"{path.name}: clear the outputs of cells {dirty} before committing"


def test_every_notebook_has_a_title_and_ends_with_checks():
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        first = nb.cells[0]
        assert first.cell_type == "markdown" and first.source.lstrip().startswith("# "), path.name
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert code, path.name
        assert "assert " in code[-1].source, f"{path.name}: the last code cell must check results"


def test_the_docs_build_executes_every_notebook():
    """docs/conf.py hands notebooks/ to the tutorials extension, which executes them before the
    pages are read; MyST-NB must not run them a second time."""
    conf = (REPO / "docs" / "conf.py").read_text()
    assert '"tutorials",' in conf and 'tutorials_source = str(ROOT / "notebooks")' in conf
    assert 'nb_execution_mode = "off"' in conf
    index = (REPO / "docs" / "index.md").read_text()
    assert "tutorials/*" in index  # every copied notebook is in the table of contents


def test_a_failing_cell_fails_the_build_and_the_others_still_run(tmp_path, monkeypatch):
    """The extension's executor on two notebooks, one with a raising cell: the error names that
    notebook and its exception, and the good one is stored with its outputs."""
    pytest.importorskip("sphinx")
    pytest.importorskip("ipykernel")
    monkeypatch.syspath_prepend(str(REPO / "docs" / "_ext"))
    monkeypatch.setenv("JUPYTER_PATH", "")
    import tutorials
    from sphinx.errors import ExtensionError

    v4 = nbformat.v4
    good, bad = tmp_path / "good.ipynb", tmp_path / "bad.ipynb"
    nbformat.write(v4.new_notebook(cells=[v4.new_code_cell("print(6 * 7)")]), good)
    cells = [v4.new_code_cell("x = 1"), v4.new_code_cell("raise ValueError('wrong answer')")]
    nbformat.write(v4.new_notebook(cells=cells), bad)
    kernel = tutorials.pin_kernel(tmp_path / "jupyter")
    with pytest.raises(ExtensionError, match="1 tutorial") as err:
        tutorials.execute_all([bad, good], kernel, timeout=120, jobs=2)
    assert "--- bad.ipynb" in str(err.value) and "ValueError: wrong answer" in str(err.value)
    assert "good.ipynb" not in str(err.value)
    (out,) = nbformat.read(good, as_version=4).cells[0].outputs
    assert out["text"] == "42\n"
