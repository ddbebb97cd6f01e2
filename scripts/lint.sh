#!/usr/bin/env bash
# Static checks: ruff (lint and format) and mypy --strict.
. "$(dirname "$0")/lib.sh"
cd "$ROOT"
.venv/bin/ruff check csi_driver tests scripts benchmarks
.venv/bin/ruff format --check csi_driver tests scripts benchmarks
.venv/bin/mypy csi_driver
