"""The tutorials: copied from ``notebooks/`` and executed, several at a time, before Sphinx reads.

Before reading the sources (``builder-inited``) this extension copies ``notebooks/*.ipynb``
(stored without outputs) into ``docs/tutorials/`` and executes each one in its own Jupyter
kernel, ``tutorials_jobs`` notebooks at a time (default: one per CPU), with a kernelspec pinned
to the interpreter running Sphinx. The executed copies, outputs and figures included, replace
the copies; MyST-NB renders them as stored (``nb_execution_mode = "off"``). A cell that raises
fails the build: every notebook still runs, and the error names each failed notebook, its cell
and the traceback. Each notebook's wall time is printed as it finishes (also under ``-q``).

Why not MyST-NB's own execution: it runs a notebook while reading it, and Sphinx's parallel
reading hands contiguous runs of pages to each process, so the tutorials (all under
``tutorials/``) still ran one after another. Each kernel keeps about one core busy (XLA compiles
on one thread), so two at a time on two cores shortens the build (measured: the nine tutorials
take 169 s in sum run one by one, and 121 s two at a time in a full CI run after the tests;
``scripts/test.sh`` now runs the build beside the tests, where they took 188 s).

Config values: ``tutorials_source`` (the folder of notebooks), ``tutorials_jobs`` (0: one per
CPU), ``tutorials_timeout`` (seconds per cell).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
import re
import shutil
import sys
import time

import nbclient
import nbformat
from sphinx.errors import ExtensionError

KERNEL = "bilevel-jax-docs"
TUTORIALS = "tutorials"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def pin_kernel(folder: pathlib.Path) -> str:
    """Write a kernelspec running ``sys.executable`` under ``folder``, put ``folder`` on
    ``JUPYTER_PATH`` (a ``python3`` spec elsewhere on the machine may start another Python),
    and return its name."""
    spec = folder / "kernels" / KERNEL / "kernel.json"
    spec.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    spec.write_text(
        json.dumps({"argv": argv, "display_name": "bilevel_jax docs", "language": "python"})
    )
    paths = os.environ.get("JUPYTER_PATH", "").split(os.pathsep)
    if str(folder) not in paths:
        os.environ["JUPYTER_PATH"] = os.pathsep.join(p for p in [str(folder), *paths] if p)
    return KERNEL


def execute(path: pathlib.Path, kernel: str, timeout: int) -> float:
    """Execute the notebook at ``path`` in its folder and store it with its outputs; returns the
    seconds it took. Raises :class:`nbclient.exceptions.CellExecutionError` if a cell raises."""
    start = time.perf_counter()
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=timeout, kernel_name=kernel, resources={"metadata": {"path": str(path.parent)}}
    )
    try:
        client.execute()
    finally:
        nbformat.write(nb, path)  # the outputs up to the failing cell, to read
    return time.perf_counter() - start


def execute_all(
    paths: list[pathlib.Path], kernel: str, timeout: int, jobs: int
) -> dict[str, float]:
    """Execute every notebook, ``jobs`` at a time (each in its own kernel process); returns the
    seconds each took. Raises :class:`ExtensionError` naming every notebook that failed."""
    times, failures = {}, {}
    with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as pool:
        futures = {pool.submit(execute, p, kernel, timeout): p.name for p in paths}
        for future in concurrent.futures.as_completed(futures):
            name = futures[future]
            try:
                times[name] = future.result()
            except Exception as e:  # noqa: BLE001 - a cell error, a timeout, a dead kernel:
                # each fails the build, after the other notebooks have run
                failures[name] = _ANSI.sub("", f"{type(e).__name__}: {e}")  # IPython's colours
                continue
            print(f"[tutorials] {name} executed in {times[name]:.1f} s", flush=True)
    if failures:
        raise ExtensionError(
            f"{len(failures)} tutorial(s) failed:\n"
            + "\n".join(f"--- {name}\n{msg}" for name, msg in sorted(failures.items()))
        )
    return times


def _run(app) -> None:
    source = pathlib.Path(app.config.tutorials_source)
    out = pathlib.Path(app.srcdir) / TUTORIALS
    out.mkdir(exist_ok=True)
    for old in out.glob("*.ipynb"):
        old.unlink()
    paths = [pathlib.Path(shutil.copy2(nb, out / nb.name)) for nb in sorted(source.glob("*.ipynb"))]
    if not paths:
        raise ExtensionError(f"no tutorial notebooks in {source}")
    kernel = pin_kernel(pathlib.Path(app.srcdir) / "_build" / "jupyter")
    jobs = app.config.tutorials_jobs or os.cpu_count() or 1
    start = time.perf_counter()
    execute_all(paths, kernel, app.config.tutorials_timeout, jobs)
    print(
        f"[tutorials] {len(paths)} notebooks executed in {time.perf_counter() - start:.1f} s "
        f"({jobs} at a time)",
        flush=True,
    )


def setup(app):
    app.add_config_value("tutorials_source", "", "env", types=[str])
    app.add_config_value("tutorials_jobs", 0, "env", types=[int])
    app.add_config_value("tutorials_timeout", 300, "env", types=[int])
    app.connect("builder-inited", _run)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
