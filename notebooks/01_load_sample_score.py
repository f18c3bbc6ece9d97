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
# # 1. Load a checkpoint, sample, and score text
#
# `llm.load(workdir)` restores a run's parameters, config and tokenizer onto this machine's
# devices. Set `WORKDIR` (or the `LLM_WORKDIR` environment variable) to one of your runs;
# otherwise a tiny `configs/tiny.py` run is trained once (seconds) and cached.

# %%
import os
import sys

# Run from notebooks/ without installing the package: put the repository root on the path.
sys.path.insert(0, os.path.abspath(".." if os.path.basename(os.getcwd()) == "notebooks" else "."))

# %matplotlib inline
import matplotlib.pyplot as plt
import numpy as np

import llm
from llm import demo, evaluate

WORKDIR = os.environ.get("LLM_WORKDIR") or demo.tiny_run()
run = llm.load(WORKDIR)
print(f"step {run.step}: {run.config.model.n_layers} layers, d_model {run.config.model.d_model}, "
      f"positional {run.config.model.positional}, vocab {run.config.model.vocab_size}")

# %% [markdown]
# ## Sample
# Same seed, same text. Temperature 0 is greedy decoding.

# %%
for temperature in (0.0, 0.8):
    text = run.generate("I had always", max_new_tokens=40, temperature=temperature, top_k=50, seed=0)
    print(f"--- temperature {temperature}\n{text}\n")

# %% [markdown]
# ## Score text
# `evaluate.score_continuations` returns log p(continuation | context) summed over the
# continuation's tokens, the quantity multiple-choice evaluation ranks choices by. The real
# continuation should beat the same characters shuffled by a wide margin; a tiny model knows
# spelling long before it knows word order, so shuffling whole words costs little (a 150-step
# model may even prefer the shuffled words).

# %%
context = "I had always thought Jack Gisburn rather a cheap genius--"
real = "though a good fellow enough--so it was no great surprise to me"
rng = np.random.default_rng(0)
candidates = {
    "real": real,
    "words shuffled": " ".join(rng.permutation(real.split())),
    "characters shuffled": "".join(rng.permutation(list(real))),
}
ll = evaluate.score_continuations(run.model, run.params, run.tokenizer, [(context, c) for c in candidates.values()],
                                  max_len=run.config.data.seq_len)
for (name, text), value in zip(candidates.items(), ll):
    print(f"{value:8.2f} nats  {name:<20} {text!r}")

# %% [markdown]
# ## Per-token surprisal
# One forward pass gives every token's log-probability given what precedes it.

# %%
import jax

ids = run.tokenizer.encode(context + real)[: run.config.data.seq_len + 1]  # positions seen in training
logits = run.model.apply({"params": run.params}, np.asarray([ids[:-1]], np.int32))
logp = jax.nn.log_softmax(np.asarray(logits[0], np.float32), axis=-1)
surprisal_bits = -np.asarray([logp[t, ids[t + 1]] for t in range(len(ids) - 1)]) / np.log(2)
pieces = [run.tokenizer.decode([i]) for i in ids[1:]]

fig, ax = plt.subplots(figsize=(10, 3))
ax.bar(range(len(pieces)), surprisal_bits, color="C0")
ax.set_xticks(range(len(pieces)), [repr(p)[1:-1] for p in pieces], rotation=70, fontsize=8)
ax.set_ylabel("surprisal (bits)")
ax.set_title(f"per-token surprisal, mean {surprisal_bits.mean():.2f} bits/token")
plt.tight_layout()
plt.show()
