#!/usr/bin/env bash
# The whole test suite: installs what it needs (idempotent), builds, then runs the
# C++ unit tests (GoogleTest via CTest) and the Python parity tests (pytest).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
scripts/build.sh
BUILD=${BUILD_DIR:-build}
ctest --test-dir "$BUILD" --output-on-failure -j 2
.venv/bin/python -m pytest -q tests/python "$@"
