#!/usr/bin/env bash
# Create .venv with the pinned, tested dependencies and the project installed in editable mode.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt -e ".[dev${LLM_EXTRAS:+,$LLM_EXTRAS}]"
