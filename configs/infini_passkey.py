"""Long-context experiment: Infini-attention vs local attention on passkey retrieval (CPU-sized).

    python -m llm.data.passkey --out=runs/data/passkey.jsonl --n=4000 --min_chars=500 --max_chars=3500
    python -m llm.train --config=configs/infini_passkey.py --workdir=runs/infini_passkey
    python -m llm.train --config=configs/infini_passkey.py:local --workdir=runs/infini_passkey_local
    python -m llm.evaluate --workdir=runs/infini_passkey --passkey_lengths=400,1500,3000 --mc_examples=0

Byte tokens (a key is five digit tokens), windows of 1,024 bytes cut from passkey documents mixed
with tiny Shakespeare; 4 layers of d 128. Arg `infini` (default): every layer Infini-attention with
segments of 128 (so a key more than 128 bytes back is only reachable through the memory); arg
`local`: the same model with sliding-window attention of 128 (the control: chance on keys further
back than the window). Infini's gates train with 10x the learning rate and no weight decay
(Hugging Face's reproduction found retrieval needs both).
Reaches: not measured yet (see the README's Infini-attention section).
"""

from configs import base


def get_config(arg: str = "infini"):
    c = base.get_config()
    c.model.d_model, c.model.n_layers, c.model.attention.n_heads = 128, 4, 4
    c.model.max_seq_len = c.data.seq_len = 1024
    c.model.attention.kind = "infini" if arg == "infini" else "local"
    c.model.attention.infini.segment_len = 128
    c.model.attention.local.window = 128
    c.data.corpus = "runs/data/passkey.jsonl,builtin:tinyshakespeare.txt"
    c.data.tokenizer.kind = "byte"
    c.train.steps, c.train.batch_size, c.train.eval_every = 1500, 8, 250
    c.optim.lr, c.optim.warmup_steps = 2e-3, 100
    c.optim.groups = ("infini_gate: lr_mult=10",)
    c.checkpoint.every = 250
    if arg not in ("infini", "local"):
        raise ValueError(f"configs/infini_passkey.py:{arg}: choose infini or local")
    return c
