#!/usr/bin/env bash
# Quick start (2): set up and run the test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
# [aot] adds libtpu so tests/test_aot.py compiles for a real TPU topology (no TPU needed);
# [torch] adds torch (CPU) and transformers, the references of tests/test_convert_hf.py.
LLM_EXTRAS=aot,torch bash scripts/setup.sh
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
.venv/bin/python -m pytest -q -n 2 --durations=15 tests "$@"
