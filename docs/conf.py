"""Sphinx configuration of the bilevel_jax documentation (Sphinx + MyST-NB).

Build (what ``bash scripts/docs.sh`` runs; warnings are errors, every notebook is executed
and a cell error fails the build):

    .venv/bin/python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

import json
import os
import pathlib
import shutil
import sys

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(DOCS / "_ext"))

import bilevel_jax  # noqa: E402

project = "bilevel_jax"
author = "the bilevel_jax developers"
copyright = "2026, the bilevel_jax developers"
release = bilevel_jax.__version__
version = release

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "api_coverage",
]

# -- sources --------------------------------------------------------------------------------
# The tutorials live in notebooks/ (the repository's top level); they are copied into
# docs/tutorials/ (git-ignored) before each build, stored there without outputs, and executed.
TUTORIALS = DOCS / "tutorials"
TUTORIALS.mkdir(exist_ok=True)
for old in TUTORIALS.glob("*.ipynb"):
    old.unlink()
for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
    shutil.copy2(nb, TUTORIALS / nb.name)

exclude_patterns = ["_build", "README.md", "jupyter_execute"]
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# -- notebooks: executed on every build; an error in any cell fails it ---------------------------
nb_execution_mode = "force"
nb_execution_raise_on_error = True
nb_execution_timeout = 300
nb_execution_show_tb = True
nb_merge_streams = True
# the kernel imports this checkout (and experiments/)
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in [str(ROOT), os.environ.get("PYTHONPATH", "")] if p
)
# the kernel's inline backend puts each figure into the page; MPLBACKEND=Agg would drop them
os.environ.pop("MPLBACKEND", None)
# A kernelspec pinned to the interpreter running Sphinx (a "python3" spec elsewhere on the
# machine may start another Python); every notebook's kernel name maps to it.
_KERNELS = DOCS / "_build" / "jupyter"
_spec = _KERNELS / "kernels" / "bilevel-jax-docs" / "kernel.json"
_spec.parent.mkdir(parents=True, exist_ok=True)
_spec.write_text(
    json.dumps(
        {
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "bilevel_jax docs",
            "language": "python",
        }
    )
)
os.environ["JUPYTER_PATH"] = os.pathsep.join(
    p for p in [str(_KERNELS), os.environ.get("JUPYTER_PATH", "")] if p
)
nb_kernel_rgx_aliases = {".*": "bilevel-jax-docs"}

# -- API reference ----------------------------------------------------------------------------
autodoc_default_options = {"members": False, "show-inheritance": False}
autodoc_typehints = "signature"
autodoc_member_order = "bysource"
autosummary_generate = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
python_use_unqualified_type_names = True

# -- output -----------------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = f"bilevel_jax {release}"
html_theme_options = {"show_toc_level": 2, "navigation_with_keys": False}
suppress_warnings = ["mystnb.unknown_mime_type"]
