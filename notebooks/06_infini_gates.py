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
# # 6. Infini-attention: gates, memory contribution, passkey retrieval
#
# Infini-attention (`model.attention.kind=infini`, llm/model/infini.py) mixes local softmax
# attention inside a segment with a compressive memory of earlier segments through a learned
# per-head gate sigmoid(beta). This notebook trains (once, cached) a tiny Infini model with
# segments of 16 tokens in windows of 64 (so three quarters of every window can reach earlier
# segments only through the memory) and reads: the gates per layer and head, and how they moved
# during training (`model/infini_gate/...` in metrics.jsonl); how much the memory changes the
# loss, position by position; and the passkey retrieval grid of `llm.evaluate`.

# %%
import os
import sys

sys.path.insert(0, os.path.abspath(".." if os.path.basename(os.getcwd()) == "notebooks" else "."))

# %matplotlib inline
import jax
import matplotlib.pyplot as plt
import numpy as np

import llm
from llm import demo, evaluate
from llm.train.metrics import read_metrics

SEGMENT = 16
WORKDIR = os.environ.get("LLM_WORKDIR") or demo.tiny_run(
    {"model.attention.kind": "infini", "model.attention.infini.segment_len": SEGMENT,
     "optim.groups": ("infini_gate: lr_mult=10",)}
)
run = llm.load(WORKDIR)
n_layers, n_heads = run.config.model.n_layers, run.config.model.attention.n_heads
gates = np.stack([1 / (1 + np.exp(-np.asarray(run.params[f"layer_{i}"]["attn"]["infini_gate"], np.float64)))
                  for i in range(n_layers)])
print("sigmoid(beta) per layer (rows) and head (columns):\n", np.round(gates, 3))

# %% [markdown]
# ## Gates: at the end, and during training
# The gate starts at sigmoid(gate_init) = 0.5 for every head; heads that find the memory useful
# move up, heads that do not move down.

# %%
rows = [r for r in read_metrics(WORKDIR) if "model/infini_gate/layer_0/0" in r]
steps = [r["step"] for r in rows]
fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 3.2))
im = ax0.imshow(gates, vmin=0, vmax=1, cmap="viridis")
ax0.set_xlabel("head")
ax0.set_ylabel("layer")
ax0.set_title("sigmoid(beta) at the end")
fig.colorbar(im, ax=ax0)
for i in range(n_layers):
    for h in range(n_heads):
        ax1.plot(steps, [r[f"model/infini_gate/layer_{i}/{h}"] for r in rows], color=f"C{i}", alpha=0.8,
                 label=f"layer {i}" if h == 0 else None)
ax1.set_xlabel("step")
ax1.set_ylabel("sigmoid(beta)")
ax1.set_title("gates during training (one line per head)")
ax1.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## What the memory contributes
# The same model on held-out text with every gate forced to 0 (beta = -30: local attention only)
# against the trained gates: the loss difference by position in the window. Positions in the first
# segment cannot differ (no memory yet); later ones show what retrieval adds (or costs).

# %%
text = open(os.path.join(demo.ROOT, "llm/data/corpora/the-verdict.txt")).read()
seq = run.config.data.seq_len
ids = np.asarray(run.tokenizer.encode(text)[: 8 * (seq + 1)], np.int32).reshape(8, seq + 1)
no_memory = jax.tree_util.tree_map_with_path(
    lambda path, v: v * 0 - 30.0 if "infini_gate" in jax.tree_util.keystr(path) else v, run.params)


def loss_by_position(params):
    logits = run.model.apply({"params": params}, ids[:, :-1])
    logp = jax.nn.log_softmax(np.asarray(logits, np.float32), -1)
    return -np.take_along_axis(np.asarray(logp), ids[:, 1:, None], -1)[..., 0].mean(0)


with_mem, without = loss_by_position(run.params), loss_by_position(no_memory)
fig, ax = plt.subplots(figsize=(8, 3))
ax.plot(without - with_mem, ".-")
for b in range(SEGMENT, seq, SEGMENT):
    ax.axvline(b - 0.5, color="k", lw=0.5, ls="--")
ax.axhline(0, color="k", lw=0.8)
ax.set_xlabel("position in the window (dashed: segment boundaries)")
ax.set_ylabel("loss without memory - with")
plt.tight_layout()
plt.show()
print(f"mean loss with memory {with_mem.mean():.4f}, local attention only {without.mean():.4f}")

# %% [markdown]
# ## Passkey retrieval
# `llm.evaluate`'s grid (teacher-forced exact retrieval of a 5-digit key hidden at a depth inside
# filler). A tiny model trained for seconds on Shakespeare has never seen a passkey: expect chance
# (about 0). configs/infini_passkey.py is the experiment that trains for it.

# %%
grid = evaluate.passkey_grid(run.model, run.params, run.tokenizer, lengths=[60, 150], depths=[0.0, 0.5, 1.0], n=4)
evaluate.passkey_heatmap(grid, title="tiny Infini model, passkey retrieval (untrained for it)")
plt.show()
