#!/usr/bin/env bash
# Runs the checks, the test suite and the docs build (sets up .venv/ from requirements.lock first):
# ruff (lint and format), then pytest (which also runs the library's doctests) with pyright and
# the documentation build (scripts/docs.sh: warnings are errors, every tutorial notebook
# executed) running beside it.
# Extra arguments go to pytest; BILEVEL_JAX_SKIP_DOCS=1 skips the docs build.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
echo "[test.sh] ruff check"
.venv/bin/ruff check bilevel_jax experiments tests docs/conf.py docs/_ext
echo "[test.sh] ruff format --check"
.venv/bin/ruff format --check bilevel_jax experiments tests docs/conf.py docs/_ext
# pyright and the docs build run beside pytest, their output kept in .cache/ and printed after
# it: pytest's two workers leave a core idle at times (a worker waiting on subprocesses, the
# last files), and pyright and Sphinx's reading are single-threaded.
mkdir -p .cache
echo "[test.sh] pyright (beside pytest; output below)"
.venv/bin/pyright > .cache/pyright.log 2>&1 &
pyright_pid=$!
docs_pid=""
if [[ "${BILEVEL_JAX_SKIP_DOCS:-0}" != 1 ]]; then
    echo "[test.sh] docs build (beside pytest; output below)"
    BILEVEL_JAX_SKIP_SETUP=1 bash scripts/docs.sh > .cache/docs.log 2>&1 &
    docs_pid=$!
fi
rc=0
# Two workers (the CI machine has 2 cores); tests of one file share a worker so that
# module-scoped fixtures (e.g. a study run once in a subprocess) run once; files are handed out
# in collection order, longest first (tests/conftest.py: SLOW_FIRST).
.venv/bin/python -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@" || rc=$?
if [[ $rc -eq 5 ]]; then
    echo "[test.sh] ERROR: pytest collected no tests (exit code 5); the suite must not be empty." >&2
    rc=1
fi
finish() {  # finish NAME PID LOG: wait for a job started beside pytest, print its output
    local jrc=0
    echo "[test.sh] $1"
    wait "$2" || jrc=$?
    cat "$3"
    if [[ $jrc -ne 0 ]]; then echo "[test.sh] ERROR: $1 failed" >&2; [[ $rc -ne 0 ]] || rc=1; fi
}
finish pyright "$pyright_pid" .cache/pyright.log
[[ -z "$docs_pid" ]] || finish "the docs build" "$docs_pid" .cache/docs.log
exit $rc
