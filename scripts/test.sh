#!/usr/bin/env bash
# Runs the checks, the test suite and the docs build (sets up .venv/ from requirements.lock first):
# ruff (lint and format), pyright, pytest (which also runs the library's doctests), then the
# documentation build (scripts/docs.sh: warnings are errors, every tutorial notebook executed).
# Extra arguments go to pytest; BILEVEL_JAX_SKIP_DOCS=1 skips the docs build.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
echo "[test.sh] ruff check"
.venv/bin/ruff check bilevel_jax experiments tests docs/conf.py docs/_ext
echo "[test.sh] ruff format --check"
.venv/bin/ruff format --check bilevel_jax experiments tests docs/conf.py docs/_ext
echo "[test.sh] pyright"
.venv/bin/pyright
rc=0
# Two workers (the CI machine has 2 cores); tests of one file share a worker so that
# module-scoped fixtures (e.g. a study run once in a subprocess) run once; files are handed out
# in collection order, longest first (tests/conftest.py: SLOW_FIRST).
.venv/bin/python -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@" || rc=$?
if [[ $rc -eq 5 ]]; then
    echo "[test.sh] ERROR: pytest collected no tests (exit code 5); the suite must not be empty." >&2
    rc=1
fi
if [[ "${BILEVEL_JAX_SKIP_DOCS:-0}" != 1 ]]; then
    echo "[test.sh] docs build"
    BILEVEL_JAX_SKIP_SETUP=1 bash scripts/docs.sh || { echo "[test.sh] ERROR: the docs build failed" >&2; [[ $rc -ne 0 ]] || rc=1; }
fi
exit $rc
