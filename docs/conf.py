"""Sphinx configuration of the bilevel_jax documentation (Sphinx + MyST-NB).

Build (what ``bash scripts/docs.sh`` runs; warnings are errors, every notebook is executed
and a cell error fails the build):

    .venv/bin/python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

import os
import pathlib
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
    "tutorials",
]

# -- sources --------------------------------------------------------------------------------
# The tutorials live in notebooks/ (the repository's top level), stored without outputs. The
# `tutorials` extension (docs/_ext/tutorials.py) copies them into docs/tutorials/ (git-ignored)
# and executes them, two at a time on two CPUs, before the pages are read; a cell error fails
# the build. MyST-NB renders the executed copies as they are.
tutorials_source = str(ROOT / "notebooks")
tutorials_jobs = int(os.environ.get("BILEVEL_JAX_DOCS_JOBS", "0"))  # 0: one per CPU
tutorials_timeout = 300  # seconds per cell

exclude_patterns = ["_build", "README.md", "jupyter_execute"]
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
nb_execution_mode = "off"  # executed already, by the tutorials extension
nb_merge_streams = True

# -- the kernels' environment ---------------------------------------------------------------------
# the kernel imports this checkout (and experiments/)
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in [str(ROOT), os.environ.get("PYTHONPATH", "")] if p
)
# the kernel's inline backend puts each figure into the page; MPLBACKEND=Agg would drop them
os.environ.pop("MPLBACKEND", None)

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
