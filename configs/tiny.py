"""Tiny config for tests and smoke runs: trains in seconds on CPU, evaluates and saves often.

Run:  python -m llm.train --config=configs/tiny.py --workdir=/tmp/tiny
Optional arg picks the architecture family: configs/tiny.py:llama (RoPE, RMSNorm, SwiGLU, GQA).
Reaches: loss falls from ~ln(vocab) to well below it within 30 steps.
"""

from configs import base
from llm.model.presets import PRESETS


def get_config(arg: str | None = None):
    if arg not in (None, "", "gpt2", "llama"):
        raise ValueError(f"configs/tiny.py:{arg}: choose gpt2 (the default) or llama")
    c = base.get_config()
    base.apply_model_preset(c, PRESETS["tiny-llama" if arg == "llama" else "tiny-gpt2"])
    c.data.corpus = "builtin:the-verdict.txt"
    c.data.seq_len = 64
    c.data.tokenizer.vocab_size = 320
    c.train.steps = 30
    c.train.batch_size = 8
    c.train.log_every = 5
    c.train.eval_every = 10
    c.train.eval_batches = 2
    c.optim.warmup_steps = 5
    c.checkpoint.every = 10
    return c
