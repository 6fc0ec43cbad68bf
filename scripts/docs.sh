#!/usr/bin/env bash
# Builds the documentation site (Sphinx + MyST-NB) into docs/_build/html/ (sets up .venv/ first).
# Warnings are errors, every tutorial notebook is executed (a cell error fails the build), and
# the API coverage check fails the build when a public name is undocumented.
# Extra arguments go to sphinx-build.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ "${BILEVEL_JAX_SKIP_SETUP:-0}" == 1 ]] || bash scripts/setup_env.sh
rm -rf docs/_build/html docs/_build/doctrees  # a fresh build: every page read, every notebook run
start=$(date +%s)
.venv/bin/python -m sphinx -W --keep-going -q -b html docs docs/_build/html "$@"
echo "[docs.sh] built docs/_build/html/index.html in $(( $(date +%s) - start )) s"
