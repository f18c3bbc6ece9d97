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
# # 4. Ablation comparison: the loss curves of a sweep
#
# A sweep trains one run per point of a grid of config overrides:
#
# ```
# python -m launch.sweep --config=configs/tiny.py --workdir=runs/sweep \
#     --sweep='model.positional=[learned,rope,alibi]' --sweep='model.attention.n_kv_heads=[1,2,4]'
# python -m llm.compare runs/sweep
# ```
#
# Set `SWEEP_DIR` (or `LLM_SWEEP_DIR`) to a sweep root; otherwise a small one (three positional
# kinds, a few dozen steps each) is run once and cached.

# %%
import os
import sys

sys.path.insert(0, os.path.abspath(".." if os.path.basename(os.getcwd()) == "notebooks" else "."))

# %matplotlib inline
import matplotlib.pyplot as plt

from llm import compare, demo

SWEEP_DIR = os.environ.get("LLM_SWEEP_DIR") or demo.tiny_sweep(
    {"model.positional": ["learned", "rope", "alibi"]},
    {"train.steps": 60, "train.eval_every": 20, "train.log_every": 5, "checkpoint.every": 0, "optim.lr": 3e-3,
     "optim.warmup_steps": 10},
)
runs, table = compare.compare([SWEEP_DIR], out=None)
print(table)

# %% [markdown]
# ## Train and held-out loss against step

# %%
fig = compare.plot_curves(runs)
display(fig)  # noqa: F821 (IPython builtin)

# %% [markdown]
# ## Final held-out bits per byte, per run
# With tiny runs the differences are small and noisy; rerun the sweep longer (`--set
# train.steps=...`) and with more seeds (`--sweep='train.seed=[0,1,2]'`) before drawing conclusions.

# %%
fig, ax = plt.subplots(figsize=(6, 3))
ax.barh([r.name for r in runs], [r.final_eval_bpb for r in runs], color=[f"C{i}" for i in range(len(runs))])
ax.set_xlabel("held-out bits per byte")
lo = min(r.final_eval_bpb for r in runs)
ax.set_xlim(lo * 0.98, max(r.final_eval_bpb for r in runs) * 1.01)
plt.tight_layout()
plt.show()
