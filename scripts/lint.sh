#!/usr/bin/env bash
# Static checks: ruff (lint and format), mypy --strict on the driver and on the tests, their
# testkit, scripts and benchmarks, and the import layers (lint-imports, contracts in pyproject.toml).
. "$(dirname "$0")/lib.sh"
cd "$ROOT"
.venv/bin/ruff check csi_driver testkit tests scripts benchmarks
.venv/bin/ruff format --check csi_driver testkit tests scripts benchmarks
.venv/bin/mypy csi_driver
.venv/bin/mypy testkit tests scripts benchmarks
.venv/bin/lint-imports
