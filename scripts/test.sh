#!/usr/bin/env bash
# Runs the checks and the test suite (sets up .venv/ from requirements.lock first):
# ruff (lint and format), pyright, then pytest (which also runs the library's doctests).
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
echo "[test.sh] ruff check"
.venv/bin/ruff check bilevel_jax experiments tests
echo "[test.sh] ruff format --check"
.venv/bin/ruff format --check bilevel_jax experiments tests
echo "[test.sh] pyright"
.venv/bin/pyright
rc=0
# Two workers (the CI machine has 2 cores); tests of one file share a worker so that
# module-scoped fixtures (e.g. a study run once in a subprocess) run once.
.venv/bin/python -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist loadfile "$@" || rc=$?
if [[ $rc -eq 5 ]]; then
    echo "[test.sh] ERROR: pytest collected no tests (exit code 5); the suite must not be empty." >&2
    exit 1
fi
exit $rc
