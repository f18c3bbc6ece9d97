"""Default config: a small GPT on tiny Shakespeare, sized for a 2-core CPU (~8 minutes).

Run:  python -m llm.train --config=configs/shakespeare.py --workdir=runs/shakespeare
Reaches: held-out bits per byte <= 2.25 (see README "Baselines" for the measured figure).
"""

from configs import base


def get_config():
    c = base.get_config()
    c.model.d_model = 256
    c.model.n_layers = 4
    c.model.attention.n_heads = 4
    c.model.max_seq_len = 256
    c.data.seq_len = 256
    c.data.tokenizer.vocab_size = 2048
    c.model.dropout = 0.1  # 1 MB of text is seen ~10 times: regularise
    c.train.steps = 1100
    c.train.batch_size = 16
    c.train.eval_every = 250
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 50
    c.checkpoint.every = 250
    return c
