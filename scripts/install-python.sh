#!/usr/bin/env bash
# Creates .venv with the project installed (editable) and its dev tools. Idempotent: reinstalls
# only when pyproject.toml changed; pip's cache makes a reinstall on a fresh clone fast.
. "$(dirname "$0")/lib.sh"
cd "$ROOT"
PY=${PYTHON:-python3}
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ -x .venv/bin/python ] && [ -f "$stamp" ]; then
    exit 0
fi
say "creating the Python environment in .venv"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[dev]'
rm -f .venv/.installed-*
touch "$stamp"
