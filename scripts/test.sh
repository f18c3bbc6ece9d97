#!/usr/bin/env bash
# Quick start (2): set up and run the test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest -q -n 2 --durations=15 tests "$@"
