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
# # 2. Attention maps and per-head attention entropy
#
# `llm.introspect.capture` runs the model once with the `intermediates` collection mutable and
# returns everything the layers `sow` (attention probabilities and logits here; router
# probabilities or memory gates for other kinds), keyed `layer_<i>/<path>/<name>`.

# %%
import os
import sys

sys.path.insert(0, os.path.abspath(".." if os.path.basename(os.getcwd()) == "notebooks" else "."))

# %matplotlib inline
import matplotlib.pyplot as plt
import numpy as np

import llm
from llm import demo, introspect

WORKDIR = os.environ.get("LLM_WORKDIR") or demo.tiny_run()
run = llm.load(WORKDIR)
text = "I had always thought Jack Gisburn rather a cheap genius--though a good fellow enough"
ids = run.tokenizer.encode(text)[: run.config.data.seq_len]
pieces = [repr(run.tokenizer.decode([i]))[1:-1] for i in ids]
cap = introspect.capture(run.model, run.params, np.asarray([ids], np.int32))
print("captured:", *[f"{k} {v.shape}" for k, v in cap.values.items()], sep="\n  ")

# %% [markdown]
# ## Attention maps
# Rows are queries, columns keys; causal, so everything above the diagonal is zero.

# %%
n_layers, n_heads = run.config.model.n_layers, run.config.model.attention.n_heads
fig, axes = plt.subplots(n_layers, n_heads, figsize=(3 * n_heads, 3 * n_layers), squeeze=False)
for layer in range(n_layers):
    probs_NTS = cap.attention(layer)[0]
    for h in range(n_heads):
        ax = axes[layer, h]
        ax.imshow(probs_NTS[h], cmap="viridis", vmin=0, vmax=1)
        ax.set_title(f"layer {layer} head {h}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
plt.tight_layout()
plt.show()

# %% [markdown]
# One head with the tokens on the axes:

# %%
fig, ax = plt.subplots(figsize=(7, 6))
im = ax.imshow(cap.attention(n_layers - 1)[0, 0], cmap="viridis")
ax.set_xticks(range(len(pieces)), pieces, rotation=90, fontsize=7)
ax.set_yticks(range(len(pieces)), pieces, fontsize=7)
ax.set_xlabel("key")
ax.set_ylabel("query")
fig.colorbar(im, ax=ax)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Per-head attention entropy
# Mean over queries of the entropy of each attention row, in nats. Uniform attention over the
# causal prefix gives the dashed line (the mean of log(t+1)); a head attending to one token gives 0.

# %%
uniform = np.mean(np.log(np.arange(1, len(ids) + 1)))
entropy = np.stack([introspect.attention_entropy(cap.attention(layer)) for layer in range(n_layers)])
fig, ax = plt.subplots(figsize=(6, 3))
width = 0.8 / n_layers
for layer in range(n_layers):
    ax.bar(np.arange(n_heads) + layer * width, entropy[layer], width, label=f"layer {layer}")
ax.axhline(uniform, color="k", ls="--", lw=1, label="uniform")
ax.set_xticks(np.arange(n_heads) + width * (n_layers - 1) / 2, [f"head {h}" for h in range(n_heads)])
ax.set_ylabel("entropy (nats)")
ax.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Statistics without bringing maps to the host
# `introspect.stats` reduces on the devices (useful for big models on a mesh) and returns only
# numbers: per-head entropy and logit moments, and the residual stream's scale per layer.

# %%
for key, s in introspect.stats(run.model, run.params, np.asarray([ids], np.int32)).items():
    print(key, {k: np.round(v, 3).tolist() for k, v in s.items()})

# %% [markdown]
# ## Local vs global vs differential attention, same prompt
# Two more tiny runs (trained once, cached): a Gemma-2-style model whose layers alternate a
# sliding window of 8 positions (`kind=local`) and full causal attention, and a model of
# differential attention layers. A local map is zero beyond a band of `window` keys below the
# diagonal. A differential map is softmax₁ − λ·softmax₂ (the two maps are sown as `attn_probs` and
# `attn_probs#1`, λ as `diff_lambda`): rows still sum to 1 − λ, and entries can go negative, which
# is how it cancels attention noise. The attention-logit monitor's statistic (max logit per layer)
# is printed for each.

# %%
WINDOW = 8
variants = {
    "local/global": demo.tiny_run({"model.attention.pattern": ("local", "causal"), "model.attention.local.window": WINDOW}),
    "differential": demo.tiny_run({"model.attention.kind": "differential"}),
}
maps = {}
for name, wd in variants.items():
    r = llm.load(wd)
    c = introspect.capture(r.model, r.params, np.asarray([ids], np.int32))
    for layer in range(r.config.model.n_layers):
        kind = r.config.model.attention.pattern[layer % 2] if r.config.model.attention.pattern else r.config.model.attention.kind
        p1 = cap_probs = c.attention(layer)[0, 0]  # head 0
        if kind == "differential":
            p2 = c.find(f"layer_{layer}/attn/attn_probs#1")[f"layer_{layer}/attn/attn_probs#1"][0, 0]
            lam = float(c.per_layer("diff_lambda")[layer])
            cap_probs = p1 - lam * p2
        logits = c.per_layer("attn_logits")[layer]
        print(f"{name} layer {layer} ({kind}): max attention logit {logits[logits > -1e29].max():.2f}")
        maps[f"{name}: layer {layer} ({kind})"] = cap_probs
maps["baseline (causal): layer 0"] = cap.attention(0)[0, 0]

fig, axes = plt.subplots(1, len(maps), figsize=(3.2 * len(maps), 3.4))
for ax, (title, m) in zip(axes, maps.items()):
    lim = np.abs(m).max()
    im = ax.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim)
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
plt.tight_layout()
plt.show()
band = np.tril(np.ones((len(ids), len(ids))), 0) - np.tril(np.ones((len(ids), len(ids))), -WINDOW)
local_map = maps["local/global: layer 0 (local)"]
print("local layer's mass outside its window:", float(np.abs(local_map * (1 - band)).sum()))
