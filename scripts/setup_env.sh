#!/usr/bin/env bash
# Idempotent set-up of the project environment in .venv/ from the pinned requirements.lock.
#
#   - creates .venv/ with python3.11 (or python3 if it is >= 3.11) when it is missing;
#   - reinstalls the pinned set when sha256(requirements.lock) differs from .venv/.lock-sha256;
#   - (re)installs this project in editable mode when pyproject.toml or the set of top-level
#     packages changed (stamp .venv/.install-sha256).
# Nothing is installed outside .venv/. Set PYTHON=/path/to/python3.11 to choose the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
LOCK=requirements.lock
LOCK_STAMP="$VENV/.lock-sha256"
INSTALL_STAMP="$VENV/.install-sha256"

log() { echo "[setup_env] $*"; }

is_py311_plus() {
    "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' >/dev/null 2>&1
}

sha256_of() {  # portable sha256 of stdin
    if command -v sha256sum >/dev/null 2>&1; then sha256sum | cut -d' ' -f1
    else shasum -a 256 | cut -d' ' -f1; fi
}

if [[ ! -x "$VENV/bin/python" ]]; then
    PY=""
    for cand in "${PYTHON:-}" python3.11 python3; do
        [[ -n "$cand" ]] || continue
        if command -v "$cand" >/dev/null 2>&1 && is_py311_plus "$cand"; then PY="$cand"; break; fi
    done
    if [[ -z "$PY" ]]; then
        echo "[setup_env] ERROR: Python >= 3.11 is required (tried \$PYTHON, python3.11, python3)." >&2
        echo "[setup_env] Install Python 3.11 or run: PYTHON=/path/to/python3.11 bash scripts/setup_env.sh" >&2
        exit 1
    fi
    log "creating $VENV with $PY ($("$PY" --version 2>&1))"
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
    rm -f "$LOCK_STAMP" "$INSTALL_STAMP"
elif ! is_py311_plus "$VENV/bin/python"; then
    echo "[setup_env] ERROR: $VENV uses $("$VENV/bin/python" --version 2>&1); Python >= 3.11 is required." >&2
    echo "[setup_env] Remove $VENV and rerun this script." >&2
    exit 1
fi

lock_sha="$(sha256_of < "$LOCK")"
if [[ ! -f "$LOCK_STAMP" || "$(cat "$LOCK_STAMP")" != "$lock_sha" ]]; then
    log "installing pinned packages from $LOCK (this takes a minute or two on a fresh machine)"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -r "$LOCK"
    echo "$lock_sha" > "$LOCK_STAMP"
    rm -f "$INSTALL_STAMP"
else
    log "pinned packages up to date ($LOCK sha256 ${lock_sha:0:12})"
fi

# The editable install maps the top-level packages found at install time, so redo it when
# pyproject.toml or the set of top-level packages changes.
install_sha="$({ cat pyproject.toml; ls -d -- */__init__.py 2>/dev/null || true; } | sha256_of)"
if [[ ! -f "$INSTALL_STAMP" || "$(cat "$INSTALL_STAMP")" != "$install_sha" ]]; then
    log "installing bilevel-jax in editable mode"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -e .
    echo "$install_sha" > "$INSTALL_STAMP"
else
    log "bilevel-jax editable install up to date"
fi
log "ready: $VENV ($("$VENV/bin/python" --version 2>&1))"
