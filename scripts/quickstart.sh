#!/usr/bin/env bash
# Quick start (1): set up, train the default model on tiny Shakespeare, print held-out bits per
# byte and a sample. Re-running resumes from the last checkpoint in runs/shakespeare.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The quick start is a CPU recipe (requirements.txt installs jax[cpu]); pinning the platform also
# keeps jax from probing a TPU runtime if the [aot] extra (libtpu) is installed in the same venv.
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
.venv/bin/python -m llm.train --config=configs/shakespeare.py --workdir=runs/shakespeare "$@"
.venv/bin/python -m llm.sample --workdir=runs/shakespeare --prompt="ROMEO:" --max_new_tokens=200 \
  --temperature=0.8 --top_k=50 --top_p=0.95 --seed=0
