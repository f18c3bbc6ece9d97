"""Default config: a small Llama-style model on tiny Shakespeare, sized for a 2-core CPU.

Run:  python -m llm.train --config=configs/shakespeare.py --workdir=runs/shakespeare
      (`configs/shakespeare.py:gpt2`: the previous default, GPT-2 style with learned positions,
      LayerNorm, GELU, biases, dropout 0.1, 1,100 steps: 2.24 bits/byte; the sweeps of 2026-11-22..29
      in docs/sweeps ran on it)
Wall time and held-out bits per byte per CPU kind: README "Quick start" (from
benchmarks/results/quickstart.json). Chosen by the sweep in docs/sweeps/shakespeare_recipe: RoPE,
RMSNorm, SwiGLU and no biases (-0.023 bits/byte against RoPE with the GPT-2 layout at 600 steps;
RoPE itself ~-0.2 against learned positions), no dropout (-0.036: ~7 passes over the 1 MB corpus
do not yet overfit at this size), AdamW at lr 2e-3 (3e-3 and Muon were not better per second),
600 steps; seed spread 0.018.
"""

from configs import base


def get_config(arg: str | None = None):
    if arg not in (None, "", "gpt2"):
        raise ValueError(f"configs/shakespeare.py takes no argument or 'gpt2', not {arg!r}")
    c = base.get_config()
    c.model.d_model = 256
    c.model.n_layers = 4
    c.model.attention.n_heads = 4
    c.model.positional = "rope"
    c.model.norm = "rmsnorm"
    c.model.mlp = "swiglu"  # d_ff = 8/3 * d_model rounded to 64 = 704: the same parameters as GELU's 4x
    c.model.use_bias = False
    c.model.max_seq_len = 256
    c.data.seq_len = 256
    c.data.tokenizer.vocab_size = 2048
    c.model.dropout = 0.0
    c.train.steps = 600
    c.train.batch_size = 16
    c.train.eval_every = 200
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 50
    c.checkpoint.every = 200
    if arg == "gpt2":
        c.model.positional, c.model.norm, c.model.mlp, c.model.use_bias = "learned", "layernorm", "gelu", True
        c.model.dropout = 0.1
        c.train.steps, c.train.eval_every, c.checkpoint.every = 1100, 250, 250
    return c
