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
# # 3. Positional encodings: how similar are two positions?
#
# - **learned** (GPT-2): a trained table; cosine similarity of its rows;
# - **sinusoidal** (Vaswani et al.): fixed sin/cos features, whose dot products depend only on
#   the distance between positions;
# - **RoPE**: rotates queries and keys, so the attention score of a query at m and a key at n
#   depends only on m - n, and its expected size decays with the distance.
#
# The learned table comes from a tiny run's checkpoint (trained for seconds, so it has barely
# moved from its random initialisation); point `LLM_WORKDIR` at a longer run to see structure.

# %%
import os
import sys

sys.path.insert(0, os.path.abspath(".." if os.path.basename(os.getcwd()) == "notebooks" else "."))

# %matplotlib inline
import matplotlib.pyplot as plt
import numpy as np

import llm
from llm import demo
from llm.model.positional import apply_rope, sinusoidal_table


def cosine_matrix(x_PD):
    x = x_PD / np.linalg.norm(x_PD, axis=-1, keepdims=True)
    return x @ x.T


WORKDIR = os.environ.get("LLM_WORKDIR") or demo.tiny_run()
run = llm.load(WORKDIR)
n_pos = run.config.model.max_seq_len
d_model = run.config.model.d_model
positions = np.arange(n_pos)
# RoPE curves use a typical head size (Llama's 128): the tiny model's 16 channels hold only 8
# frequencies, too few for a smooth picture.
head_dim = 128

# %% [markdown]
# ## Cosine similarity between positions

# %%
panels = {"sinusoidal": np.asarray(sinusoidal_table(positions[None], d_model))[0]}
if "pos_embed" in run.params:
    panels = {"learned (tiny run)": np.asarray(run.params["pos_embed"]["embedding"]), **panels}
else:
    print(f"{WORKDIR} uses positional={run.config.model.positional}: no learned table to show")

# RoPE: one random vector rotated to every position; the cosine between positions m and n
# depends only on m - n (the matrix is Toeplitz).
rng = np.random.default_rng(0)
v_H = rng.standard_normal(head_dim).astype(np.float32)
rotated_PH = np.asarray(apply_rope(np.broadcast_to(v_H, (1, n_pos, 1, head_dim)), positions[None], 10000.0))[0, :, 0]
panels["RoPE (rotated vector)"] = rotated_PH

fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4))
for ax, (name, table) in zip(np.atleast_1d(axes), panels.items()):
    im = ax.imshow(cosine_matrix(table), cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_title(name)
    ax.set_xlabel("position")
    ax.set_ylabel("position")
fig.colorbar(im, ax=np.atleast_1d(axes).tolist(), shrink=0.8)
plt.show()

# %% [markdown]
# ## RoPE: the score decays with distance
# For a query and key that are the same vector q, the RoPE score is
# q·R(m-n)q = Σ_i |q_i|² cos((m-n)θ_i). Averaged over random vectors it is
# Σ_i cos(d θ_i) / (H/2) relative to distance 0: it falls off with the distance d
# (Su et al. 2021, section 3.4.3), more slowly for a larger base θ.

# %%
distances = np.arange(0, 1024)
fig, ax = plt.subplots(figsize=(7, 3.5))
for theta in (100.0, 10000.0, 500000.0):
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    relative = np.cos(distances[:, None] * inv_freq[None]).mean(-1)
    ax.plot(distances, relative, label=f"theta={theta:g}", lw=1)
q = rng.standard_normal((1024, head_dim)).astype(np.float32)
pos = np.broadcast_to(np.array([[0]]), (1024, 1))
q0 = np.asarray(apply_rope(q[:, None, None], pos, 10000.0))[:, 0, 0]
empirical = []
for d in distances[::32]:
    qd = np.asarray(apply_rope(q[:, None, None], pos + d, 10000.0))[:, 0, 0]
    empirical.append(np.mean(np.sum(qd * q0, -1) / np.sum(q0 * q0, -1)))
ax.plot(distances[::32], empirical, "k.", label="apply_rope, theta=1e4 (mean over random q=k)")
ax.set_xscale("symlog", linthresh=10)
ax.set_xlabel("distance m - n")
ax.set_ylabel("score / score at distance 0")
ax.axhline(0, color="k", lw=0.5)
ax.legend(fontsize=8)
plt.tight_layout()
plt.show()
