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
    """docs/conf.py copies notebooks/*.ipynb into the site and executes them on every build."""
    conf = (REPO / "docs" / "conf.py").read_text()
    assert 'nb_execution_mode = "force"' in conf and "nb_execution_raise_on_error = True" in conf
    assert '(ROOT / "notebooks").glob("*.ipynb")' in conf
    index = (REPO / "docs" / "index.md").read_text()
    assert "tutorials/*" in index  # every copied notebook is in the table of contents
