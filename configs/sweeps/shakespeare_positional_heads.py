"""Sweep: positional encoding x attention heads (MQA vs MHA) on the default Shakespeare model, 6 runs.

Run:  python -m launch.sweep --sweep_file=configs/sweeps/shakespeare_positional_heads.py \\
          --workdir=runs/shakespeare_sweep
Then: python -m llm.compare runs/shakespeare_sweep --out=docs/sweeps/shakespeare_positional_heads
Reaches: ~5-6 min per run on 2 CPU cores (400 steps of 16 x 256 tokens, d_model 256, 4 layers);
the table and plot it produced are in the README ("A real sweep").
"""


def get_sweep():
    return {
        "config": "configs/shakespeare.py:gpt2",  # the default model when this sweep ran
        "axes": {
            "model.positional": ["learned", "rope", "alibi"],
            "model.attention.n_kv_heads": [1, 4],  # MQA (one shared K/V head) vs MHA (4 heads)
        },
        # A shortened schedule so the grid fits in about half an hour on 2 cores.
        "set": {"train.steps": 400, "train.eval_every": 100, "checkpoint.every": 0},
    }
