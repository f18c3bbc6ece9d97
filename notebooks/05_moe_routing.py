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
# # 5. Mixture-of-Experts routing
#
# Which experts does the router pick, how evenly is the load spread, and does routing follow the
# tokens? An MoE feed-forward layer sows its router probabilities into `intermediates`, so
# `llm.introspect.capture` picks them up like attention maps, with no MoE-specific code here.
#
# This notebook skips (with a message) while the codebase has no MoE feed-forward kind.

# %%
import os
import sys

sys.path.insert(0, os.path.abspath(".." if os.path.basename(os.getcwd()) == "notebooks" else "."))

import dataclasses

# %matplotlib inline
import matplotlib.pyplot as plt
import numpy as np

import llm
from llm import demo, introspect
from llm.model import config as model_config
from llm.model import registries

# An MoE kind is a registered feed-forward kind named "moe"; its config key depends on whether
# the model config has an `ffn` section (DESIGN.md: --config.model.ffn.kind=moe) or only `mlp`.
ffn_registry = getattr(registries, "FFN", None) or registries.MLP
fields = {f.name for f in dataclasses.fields(model_config.ModelConfig)}
HAS_MOE = "moe" in ffn_registry
if HAS_MOE:
    override = {"model.ffn.kind": "moe"} if "ffn" in fields else {"model.mlp": "moe"}
    print("MoE kind found; overrides:", override)
else:
    print(f"No MoE feed-forward kind in this codebase yet (known {ffn_registry.axis} kinds: "
          f"{', '.join(ffn_registry.names())}); skipping this notebook.")

# %%
if HAS_MOE:
    WORKDIR = os.environ.get("LLM_WORKDIR") or demo.tiny_run(override)
    run = llm.load(WORKDIR)
    text = "I had always thought Jack Gisburn rather a cheap genius--though a good fellow enough"
    ids = run.tokenizer.encode(text)[: run.config.data.seq_len]
    cap = introspect.capture(run.model, run.params, np.asarray([ids], np.int32))
    routing = {k: v for k, v in cap.values.items() if "rout" in k.rsplit("/", 1)[-1]}
    print("sown routing values:", {k: v.shape for k, v in routing.items()} or "none found")

# %% [markdown]
# ## Router probabilities per token, and the load per expert

# %%
if HAS_MOE and routing:
    fig, axes = plt.subplots(len(routing), 2, figsize=(11, 3 * len(routing)), squeeze=False)
    for row, (key, probs) in enumerate(routing.items()):
        probs_TE = np.asarray(probs).reshape(-1, probs.shape[-1])[: len(ids)]
        axes[row, 0].imshow(probs_TE.T, aspect="auto", cmap="viridis")
        axes[row, 0].set_title(f"{key}: router probability (expert x token)", fontsize=9)
        load_E = np.bincount(probs_TE.argmax(-1), minlength=probs_TE.shape[-1]) / len(probs_TE)
        axes[row, 1].bar(range(len(load_E)), load_E)
        axes[row, 1].axhline(1 / len(load_E), color="k", ls="--", lw=1, label="balanced")
        axes[row, 1].set_title("fraction of tokens whose top expert is e", fontsize=9)
        axes[row, 1].legend(fontsize=8)
    plt.tight_layout()
    plt.show()
elif HAS_MOE:
    print("the MoE kind sows nothing named *rout*; nothing to plot")
