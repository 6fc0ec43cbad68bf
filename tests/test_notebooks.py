"""Execute every notebook in notebooks/ and fail on any cell error.

Notebooks carry their own checks (a final cell of ``assert``s), so a notebook that
runs but gets the wrong answer fails here too. Notebooks are stored without outputs;
they are executed in a temporary working directory, and the stored file is never
rewritten.

The kernel is pinned to the interpreter running pytest: a throwaway kernelspec whose
argv starts with ``sys.executable`` is written under the test's tmp directory, so an
unrelated ``python3`` kernelspec installed elsewhere on the machine is never picked up
and nothing in the environment is modified.
"""

import os
import pathlib
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from ipykernel.kernelspec import write_kernel_spec  # noqa: E402
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402
from jupyter_client.manager import KernelManager  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
KERNEL_NAME = "bilevel-jax-test"


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


def _kernel_manager(tmp_path):
    kernels = tmp_path / "kernels"
    write_kernel_spec(
        path=str(kernels / KERNEL_NAME)
    )  # argv = [sys.executable, -m, ipykernel_launcher, ...]
    ksm = KernelSpecManager(kernel_dirs=[str(kernels)])
    spec = ksm.get_kernel_spec(KERNEL_NAME)
    assert spec.argv[0] == sys.executable, spec.argv
    return KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=ksm)


def _kernel_env():
    env = dict(os.environ)
    # The kernel must import this checkout's bilevel_jax even without `pip install -e .`.
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO), env.get("PYTHONPATH", "")] if p)
    env.setdefault("MPLBACKEND", "Agg")  # no display; figures are still built and drawn
    return env


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    workdir = tmp_path / "run"
    workdir.mkdir()
    client = nbclient.NotebookClient(
        nb,
        km=_kernel_manager(tmp_path),
        timeout=300,
        resources={"metadata": {"path": str(workdir)}},
    )
    try:
        client.execute(env=_kernel_env(), cwd=str(workdir))
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"{path.name} failed:\n{e}", pytrace=False)
