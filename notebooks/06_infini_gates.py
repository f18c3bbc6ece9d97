# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: -all
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 6. Infini-attention gates
#
# Infini-attention mixes local softmax attention with a compressive memory through a learned
# per-head gate sigmoid(beta). Where the gate sits says how much each head reads from memory. The
# attention kind sows its gate (and memory statistics) into `intermediates`, so
# `llm.introspect.capture` finds them with no Infini-specific code here; the gate parameters are
# also read from the checkpoint directly.
#
# This notebook skips (with a message) while the codebase has no `infini` attention kind.

# %%
import os
import sys

sys.path.insert(0, os.path.abspath(".." if os.path.basename(os.getcwd()) == "notebooks" else "."))

# %matplotlib inline
import matplotlib.pyplot as plt
import numpy as np

import llm
from llm import demo, introspect
from llm.model import registries

HAS_INFINI = "infini" in registries.ATTENTION
if HAS_INFINI:
    print("infini attention kind found")
else:
    print(f"No 'infini' attention kind in this codebase yet (known attention kinds: "
          f"{', '.join(registries.ATTENTION.names())}); skipping this notebook.")

# %%
if HAS_INFINI:
    WORKDIR = os.environ.get("LLM_WORKDIR") or demo.tiny_run({"model.attention.kind": "infini"})
    run = llm.load(WORKDIR)
    ids = run.tokenizer.encode(open(os.path.join(demo.ROOT, "llm/data/corpora/the-verdict.txt")).read())
    ids = ids[: run.config.data.seq_len]
    cap = introspect.capture(run.model, run.params, np.asarray([ids], np.int32))
    gates = {k: v for k, v in cap.values.items() if "gate" in k.rsplit("/", 1)[-1]}
    print("sown gate values:", {k: v.shape for k, v in gates.items()} or "none found")
    # The gate parameters themselves: any parameter whose name mentions "gate" or "beta".
    import jax

    params = {"/".join(str(getattr(p, "key", p)) for p in path): np.asarray(v)
              for path, v in jax.tree_util.tree_leaves_with_path(run.params)}
    gate_params = {k: v for k, v in params.items() if "gate" in k or "beta" in k}
    print("gate parameters:", {k: v.shape for k, v in gate_params.items()} or "none found")

# %% [markdown]
# ## Memory share per head: sigmoid(gate) per layer

# %%
if HAS_INFINI and (gate_params or gates):
    source = gate_params or gates
    fig, ax = plt.subplots(figsize=(7, 3))
    for i, (key, value) in enumerate(sorted(source.items())):
        share = 1 / (1 + np.exp(-np.asarray(value, np.float64).reshape(-1))) if key in gate_params else value.reshape(-1)
        ax.plot(share, "o-", label=key, color=f"C{i % 10}")
    ax.set_xlabel("head (flattened)")
    ax.set_ylabel("memory share")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    plt.tight_layout()
    plt.show()
elif HAS_INFINI:
    print("no gate parameters or sown gates found; nothing to plot")
