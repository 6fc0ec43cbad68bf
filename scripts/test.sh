#!/usr/bin/env bash
# Runs the test suite (sets up .venv/ from requirements.lock first). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
rc=0
# Two workers (the CI machine has 2 cores); tests of one file share a worker so that
# module-scoped fixtures (e.g. a study run once in a subprocess) run once.
.venv/bin/python -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist loadfile "$@" || rc=$?
if [[ $rc -eq 5 ]]; then
    echo "[test.sh] ERROR: pytest collected no tests (exit code 5); the suite must not be empty." >&2
    exit 1
fi
exit $rc
