"""Sweep: positional encoding x KV-head layout (MQA, GQA, MHA) on the tiny config, 9 runs.

Run:  python -m launch.sweep --sweep_file=configs/sweeps/positional_heads.py --workdir=runs/sweep
Then: python -m llm.compare runs/sweep
Reaches: each run finishes in well under a minute on 2 CPU cores; at 30 steps the positional kind
moves the held-out loss by only a few hundredths of a nat, so lengthen with --set train.steps=300.
"""


def get_sweep():
    return {
        "config": "configs/tiny.py",
        "axes": {
            "model.positional": ["learned", "rope", "alibi"],
            "model.attention.n_kv_heads": [1, 2, 4],
        },
        "set": {},
    }
