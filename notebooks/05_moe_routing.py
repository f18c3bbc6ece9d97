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
# Which experts does the router pick, how evenly is the load spread while training, and how many
# assignments does a capacity drop? The MoE layer (`model.ffn.kind=moe`, llm/model/moe.py) logs
# its load per expert and drop rate through the metrics channel (`metrics.jsonl`), and sows its
# router probabilities and chosen experts, which `llm.introspect.capture` picks up like
# attention maps.
#
# The run: configs/tiny.py with 4 experts, top-2, GShard-style capacity 1.0 (so some tokens are
# dropped early on), trained once into the demo cache (seconds). `LLM_WORKDIR` points it at your own
# MoE run instead.

# %%
import os
import sys

sys.path.insert(0, os.path.abspath(".." if os.path.basename(os.getcwd()) == "notebooks" else "."))

# %matplotlib inline
import matplotlib.pyplot as plt
import numpy as np

import llm
from llm import demo, introspect
from llm.train.metrics import read_metrics

MOE = {"model.ffn.kind": "moe", "model.ffn.moe.num_experts": 4, "model.ffn.moe.top_k": 2,
       "model.ffn.moe.impl": "dense", "model.ffn.moe.capacity_factor": 1.0}
WORKDIR = os.environ.get("LLM_WORKDIR") or demo.tiny_run(MOE)
run = llm.load(WORKDIR)
m = run.config.model.ffn.moe
print(f"{run.config.model.n_layers} layers, {m.num_experts} experts, top-{m.top_k}, router {m.router}, "
      f"impl {m.impl}, capacity factor {m.capacity_factor}")

# %% [markdown]
# ## Expert load per layer over training, and the drop rate
#
# `model/moe_load/layer_<i>/<e>` is the fraction of routed assignments that went to expert e
# (1/E = balanced); `model/moe_drop_fraction` the share of assignments past an expert's capacity.

# %%
rows = [r for r in read_metrics(WORKDIR) if "loss" in r]
steps = [r["step"] for r in rows]
layers = sorted({int(k.split("/")[2].split("_")[1]) for k in rows[0] if k.startswith("model/moe_load/layer_")})
fig, axes = plt.subplots(1, len(layers) + 1, figsize=(4 * (len(layers) + 1), 3))
for ax, layer in zip(axes, layers):
    for e in range(m.num_experts):
        ax.plot(steps, [r[f"model/moe_load/layer_{layer}/{e}"] for r in rows], label=f"expert {e}")
    ax.axhline(1 / m.num_experts, color="k", ls="--", lw=1)
    ax.set_title(f"layer {layer}: load per expert", fontsize=9)
    ax.set_xlabel("step")
axes[0].legend(fontsize=7)
axes[-1].plot(steps, [r["model/moe_drop_fraction"] for r in rows])
axes[-1].set_title("fraction of assignments dropped (mean over layers)", fontsize=9)
axes[-1].set_xlabel("step")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Token → expert for a prompt
#
# Router probability per token and expert in each MoE layer; dots mark the top-k experts chosen.

# %%
text = "I had always thought Jack Gisburn rather a cheap genius--though a good fellow enough"
ids = run.tokenizer.encode(text)[: run.config.data.seq_len]
cap = introspect.capture(run.model, run.params, np.asarray([ids], np.int32), names=["router_probs", "expert_index"])
probs, chosen = cap.per_layer("router_probs"), cap.per_layer("expert_index")
pieces = [run.tokenizer.decode([i]) for i in ids]
fig, axes = plt.subplots(len(probs), 1, figsize=(12, 2.2 * len(probs)), squeeze=False)
for ax, (layer, p) in zip(axes[:, 0], probs.items()):
    ax.imshow(np.asarray(p)[0].T, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    for k in range(chosen[layer].shape[-1]):
        ax.scatter(np.arange(len(ids)), np.asarray(chosen[layer])[0, :, k], s=6, c="w")
    ax.set_yticks(range(m.num_experts))
    ax.set_ylabel(f"layer {layer}\nexpert")
axes[-1, 0].set_xticks(range(len(ids)))
axes[-1, 0].set_xticklabels(pieces, rotation=90, fontsize=7)
plt.tight_layout()
plt.show()
print("tokens per expert (top-1 choice) in this prompt:",
      {layer: np.bincount(np.asarray(c)[0, :, 0], minlength=m.num_experts).tolist() for layer, c in chosen.items()})
